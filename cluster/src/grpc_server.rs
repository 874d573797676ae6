//! What every Switchyard gRPC server (router, control plane, worker) shares: a bound on the
//! streams one connection may open, and requests that cannot be read answered as the client's
//! fault. Tonic reports such a request as `INTERNAL` (bytes that are not a message, a missing
//! or truncated one, a bad compression flag) or `OUT_OF_RANGE` (one over the size limit), as if
//! the server had failed. [`client_fault`] tells those reports apart from a server's own
//! faults: a router's `Session` reads them from its request stream; a unary or server-streaming
//! call gets them before any handler runs, so [`as_client_fault`] rewrites its response's
//! status, in the layer [`builder`] installs. The builder also stamps each call's arrival, so
//! handlers hold its `grpc-timeout` as tonic does (see [`crate::deadline`]).

use http::HeaderValue;
use tonic::body::Body;
use tonic::transport::Server;
use tonic::{Code, Status};
use tower::layer::util::{Identity, Stack};
use tower::util::{MapRequestLayer, MapResponseLayer};

type Stamp = MapRequestLayer<fn(http::Request<Body>) -> http::Request<Body>>;
type Blame = MapResponseLayer<fn(http::Response<Body>) -> http::Response<Body>>;

/// A gRPC server builder with the shared settings (see [`builder`]).
pub type Builder = Server<Stack<Blame, Stack<Stamp, Identity>>>;

/// A server builder whose connections may each open at most `max_connection_streams` streams
/// (unset, tonic lets one connection open streams without bound) and whose answers to
/// requests it cannot read say it was the client's fault (`INVALID_ARGUMENT`,
/// `RESOURCE_EXHAUSTED`); every call carries its [`crate::deadline::CallArrival`].
pub fn builder(max_connection_streams: u32) -> Builder {
    let stamp_arrival: fn(http::Request<Body>) -> http::Request<Body> =
        crate::deadline::stamp_arrival;
    let as_client_fault: fn(http::Response<Body>) -> http::Response<Body> = as_client_fault;
    Server::builder()
        .max_concurrent_streams(Some(max_connection_streams))
        .layer(MapRequestLayer::new(stamp_arrival))
        .layer(MapResponseLayer::new(as_client_fault))
}

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

    /// A server from [`builder`], seen by a raw HTTP/2 client: it announces its stream bound,
    /// and answers unreadable requests as the client's fault.
    #[tokio::test]
    async fn a_built_server_bounds_streams_and_blames_unreadable_requests_on_the_client() {
        let listener = crate::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let incoming =
            crate::listen::plaintext(listener, crate::listen::ConnectionTimeouts::default())
                .unwrap();
        let addr = incoming.local_addr();
        let (_health, health_service) = tonic_health::server::health_reporter();
        tokio::spawn(
            builder(7)
                .add_service(health_service)
                .serve_with_incoming(incoming),
        );
        // gRPC message prefixes: not compressed, then the length.
        let garbage: &[u8] = &[0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        let oversized: &[u8] = &[0, 0, 0x4c, 0x4b, 0x40]; // 5 000 000 bytes announced
        for (body, code) in [
            (garbage, Code::InvalidArgument),
            (oversized, Code::ResourceExhausted),
        ] {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
            let mut connection = std::pin::pin!(connection);
            let request = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut stream) = send.send_request(request, false).unwrap();
            stream
                .send_data(bytes::Bytes::from_static(body), true)
                .unwrap();
            let response = tokio::select! {
                response = response => response.unwrap(),
                ended = &mut connection => panic!("the connection ended first: {ended:?}"),
            };
            // A trailers-only answer: the status is in the headers.
            let status = Status::from_header_map(response.headers()).expect("a grpc-status");
            assert_eq!(status.code(), code, "{body:?}: {status:?}");
            assert_eq!(connection.max_concurrent_send_streams(), 7);
        }
    }
}
