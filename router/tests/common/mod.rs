//! What the router's integration tests share.

use std::future::Future;
use std::time::Duration;

/// Asks `check` again every 10 ms until it holds, failing the test after `patience`: for
/// state that changes without an event to await (a router's view of its workers, its prefix
/// index following frames).
pub async fn eventually<F>(what: &str, patience: Duration, mut check: impl FnMut() -> F)
where
    F: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
