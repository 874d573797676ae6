//! A gRPC call's deadline (its `grpc-timeout`), as every Switchyard server holds it. Tonic
//! bounds only the wait for a response's headers by it, answering `CANCELLED` when it passes
//! there; a streaming answer's frames after the headers are not bounded at all. The servers
//! built by [`crate::grpc_server::builder`] stamp each call's arrival ([`CallArrival`]) as
//! tonic starts its own timer, so [`call_deadline`] is that timer's deadline: a handler can
//! end the call `DEADLINE_EXCEEDED` first ([`ahead_of_tonic`]) and end a stream at it
//! ([`until_deadline`]).

use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio::time::Instant;
use tonic::Status;

/// When the server began serving a call: set by the builder's first layer, just inside tonic's
/// `grpc-timeout` timer.
#[derive(Debug, Clone, Copy)]
pub struct CallArrival(pub Instant);

/// Stamps `request` with its [`CallArrival`].
pub fn stamp_arrival<B>(mut request: http::Request<B>) -> http::Request<B> {
    request.extensions_mut().insert(CallArrival(Instant::now()));
    request
}

/// When the call's `grpc-timeout` runs out, counted from its arrival; `None` without one.
pub fn call_deadline<T>(request: &tonic::Request<T>) -> Option<Instant> {
    let arrived = request
        .extensions()
        .get::<CallArrival>()
        .map_or_else(Instant::now, |arrival| arrival.0);
    arrived.checked_add(grpc_timeout(request.metadata())?)
}

/// The granularity of tokio's timers.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// A moment before tonic's own timer for the call whose deadline is `deadline` fires: a wait
/// that ends then lets the handler answer `DEADLINE_EXCEEDED` before tonic answers `CANCELLED`,
/// whichever way the two timers' ticks fall (tonic polls the handler before its timer).
pub fn ahead_of_tonic(deadline: Instant) -> Instant {
    deadline.checked_sub(TIMER_TICK).unwrap_or(deadline)
}

/// The status of a call whose deadline passed.
pub fn deadline_passed() -> Status {
    Status::deadline_exceeded("the call's deadline (grpc-timeout) passed")
}

/// The call's `grpc-timeout` (e.g. `200m`: 200 ms). A value the gRPC spec does not allow is no
/// timeout, as tonic reads it: more than 8 digits, in particular, would overflow the clock.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    if amount.len() > 8 {
        return None;
    }
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `frames` until `deadline`, then `DEADLINE_EXCEEDED`: the rest of the stream is dropped
/// (which, for a generation, cancels it on its worker).
pub fn until_deadline<T: Send + 'static>(
    frames: impl Stream<Item = Result<T, Status>> + Send + 'static,
    deadline: Instant,
) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
    let expired = futures::stream::once(async move {
        (Instant::now() >= deadline).then(|| Err(deadline_passed()))
    })
    .filter_map(std::future::ready);
    frames
        .take_until(tokio::time::sleep_until(deadline))
        .chain(expired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(value: &str) -> Option<Duration> {
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().expect("ascii"));
        grpc_timeout(request.metadata())
    }

    #[test]
    fn grpc_timeouts_read_as_the_spec_writes_them() {
        assert_eq!(timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        // Out of spec: no deadline, as tonic reads it.
        for bad in ["", "m", "123456789S", "5x", "-5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_calls_arrival() {
        let arrived = Instant::now();
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", "100m".parse().expect("ascii"));
        request.extensions_mut().insert(CallArrival(arrived));
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(
            call_deadline(&request),
            Some(arrived + Duration::from_millis(100))
        );
        assert_eq!(
            ahead_of_tonic(arrived + Duration::from_millis(100)),
            arrived + Duration::from_millis(99)
        );
    }
}
