//! A request the router cannot decode is the client's fault, not the server's: tonic answers
//! one with `INTERNAL` (bytes that are not a message, a missing or truncated one) or
//! `OUT_OF_RANGE` (one over the size limit) before any handler runs — `Generate`'s only
//! chance to say so is the response's status. This maps those answers to `INVALID_ARGUMENT`
//! and `RESOURCE_EXHAUSTED`, as a `Session` reports the same bytes ([`crate::session`]).

use http::HeaderValue;

/// tonic's messages for a request it could not decode (percent-encoded, as `grpc-message`
/// carries them), with the code the client should get instead.
const CLIENT_FAULTS: [(&str, &str, &str); 5] = [
    ("13", "failed%20to%20decode", "3"),
    ("13", "Missing%20request%20message", "3"),
    ("13", "Unexpected%20EOF%20decoding", "3"),
    (
        "13",
        "protocol%20error:%20received%20message%20with%20invalid%20compression",
        "3",
    ),
    (
        "11",
        "Error,%20decoded%20message%20length%20too%20large",
        "8",
    ),
];

/// The response with a decoding failure's status changed to the client-fault code.
pub fn as_client_fault<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let (Some(status), Some(message)) = (headers.get("grpc-status"), headers.get("grpc-message"))
    else {
        return response;
    };
    let message = message.as_bytes();
    let fault = CLIENT_FAULTS
        .iter()
        .find(|(code, prefix, _)| status == code && message.starts_with(prefix.as_bytes()));
    if let Some((_, _, code)) = fault {
        headers.insert("grpc-status", HeaderValue::from_static(code));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: &'static str, message: &'static str) -> http::Response<()> {
        http::Response::builder()
            .header("grpc-status", status)
            .header("grpc-message", message)
            .body(())
            .expect("a response")
    }

    fn status(response: http::Response<()>) -> String {
        let response = as_client_fault(response);
        response.headers()["grpc-status"]
            .to_str()
            .expect("ascii")
            .to_string()
    }

    #[test]
    fn decoding_failures_become_the_clients_fault_and_nothing_else_changes() {
        assert_eq!(
            status(answer("13", "failed%20to%20decode%20Protobuf%20message")),
            "3"
        );
        assert_eq!(status(answer("13", "Missing%20request%20message.")), "3");
        assert_eq!(
            status(answer(
                "11",
                "Error,%20decoded%20message%20length%20too%20large:%20found%2010485780%20bytes"
            )),
            "8"
        );
        // The router's own faults and every other answer stay as they are.
        assert_eq!(
            status(answer("13", "dispatcher%20sent%20an%20empty%20frame")),
            "13"
        );
        assert_eq!(status(answer("11", "failed%20to%20decode")), "11");
        assert_eq!(status(answer("0", "")), "0");
    }
}
