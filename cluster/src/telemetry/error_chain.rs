//! One-line error text with every cause: `transport error: tcp connect error: Connection refused
//! (os error 111)` where `%error` alone says `transport error`.

use std::error::Error;
use std::fmt;

/// Displays an error followed by its sources (`std::error::Error::source`), `: `-separated, on
/// one line. A cause whose text its parent already shows is not repeated; a gRPC status shows
/// as `<code>: <message>` (its own `Display` adds its source in `Debug` form); the sources
/// inside an `etcd_client::Error` (which does not expose them) are followed too.
///
/// ```
/// # use switchyard_cluster::telemetry::ErrorChain;
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// tracing::warn!(error = %ErrorChain(&refused), "link failed");
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain_text(self.0))
    }
}

/// [`ErrorChain`]'s text.
pub fn chain_text(error: &(dyn Error + 'static)) -> String {
    let mut out = String::new();
    let mut current = Some(error);
    while let Some(error) = current {
        let next = source(error);
        let own = own_text(error, next);
        if !own.is_empty() && !out.contains(&own) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&own);
        }
        current = next;
    }
    out
}

/// The cause of `error`, seeing through `etcd_client::Error`, which keeps its cause to itself.
fn source<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a (dyn Error + 'static)> {
    if let Some(etcd) = error.downcast_ref::<etcd_client::Error>() {
        return match etcd {
            etcd_client::Error::GRpcStatus(status) => Some(status),
            etcd_client::Error::TransportError(transport) => Some(transport),
            etcd_client::Error::IoError(io) => Some(io),
            _ => None,
        };
    }
    error.source()
}

/// What `error` says beyond its cause: its `Display` without the cause's text when it ends
/// with it (`etcd: <cause>` gives `etcd`).
fn own_text(error: &(dyn Error + 'static), next: Option<&(dyn Error + 'static)>) -> String {
    if let Some(status) = error.downcast_ref::<tonic::Status>() {
        return if status.message().is_empty() {
            format!("{:?}", status.code())
        } else {
            format!("{:?}: {}", status.code(), status.message())
        };
    }
    let text = error.to_string();
    let Some(next) = next else { return text };
    let cause = next.to_string();
    match text.strip_suffix(cause.as_str()) {
        Some(own) if !cause.is_empty() => own.trim_end_matches([' ', ':']).to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("link failed")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("registry: {0}")]
    struct Wrapping(#[from] std::io::Error);

    fn refused() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused")
    }

    #[test]
    fn every_cause_is_shown_once_on_one_line() {
        assert_eq!(
            ErrorChain(&Outer(refused())).to_string(),
            "link failed: Connection refused"
        );
        // A parent that prints its cause already.
        assert_eq!(
            ErrorChain(&Wrapping(refused())).to_string(),
            "registry: Connection refused"
        );
    }

    #[test]
    fn a_grpc_status_shows_its_code_and_message_and_its_causes_without_debug_dumps() {
        let status = tonic::Status::from_error(Box::new(Outer(refused())));
        let etcd = etcd_client::Error::GRpcStatus(status);
        let text = ErrorChain(&etcd).to_string();
        assert!(text.starts_with("grpc request error: Unknown: "), "{text}");
        assert!(text.ends_with("Connection refused"), "{text}");
        assert!(!text.contains("Custom {"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
}
