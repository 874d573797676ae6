//! Keeps a router's routing policy current: follows the `policy` key of the cluster store,
//! validates every new document and applies it without restart. An invalid document is
//! rejected (logged with the field at fault) and the policy in force stays; a deleted one
//! falls back to the router's built-in default.

use std::sync::Arc;

use switchyard_cluster::{Registry, RegistryError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::policy::document::PolicyDocument;

/// The policy in force, shared by every request of a router.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    current: watch::Receiver<Arc<PolicyDocument>>,
}

impl PolicyHandle {
    /// A policy that never changes (single-process tools, tests).
    pub fn fixed(policy: PolicyDocument) -> Self {
        // The receiver keeps the last value after the sender is gone.
        let (_, current) = watch::channel(Arc::new(policy));
        Self { current }
    }

    /// A handle showing `initial` until a follower started with the returned sender (see
    /// [`follow_stored`]) applies the stored policy: a router waiting for its cluster store
    /// routes by its built-in default meanwhile.
    pub fn pending(initial: PolicyDocument) -> (Self, watch::Sender<Arc<PolicyDocument>>) {
        let (tx, current) = watch::channel(Arc::new(initial));
        (Self { current }, tx)
    }

    pub fn current(&self) -> Arc<PolicyDocument> {
        self.current.borrow().clone()
    }

    /// Waits for the next applied policy; `false` once the follower has stopped.
    pub async fn changed(&mut self) -> bool {
        self.current.changed().await.is_ok()
    }
}

/// Starts following the stored policy. `fallback` applies while none is stored.
pub async fn follow(
    registry: &Arc<dyn Registry>,
    fallback: PolicyDocument,
    shutdown: CancellationToken,
) -> Result<PolicyHandle, RegistryError> {
    let stored = registry.watch_policy().await?;
    let (handle, tx) = PolicyHandle::pending(fallback.clone());
    follow_stored(stored, fallback, tx, shutdown);
    Ok(handle)
}

/// Applies the stored policy `stored` follows (validated; `fallback` while none is stored) to
/// `tx`, now and at every change until `shutdown` fires.
pub fn follow_stored(
    mut stored: watch::Receiver<Option<Vec<u8>>>,
    fallback: PolicyDocument,
    tx: watch::Sender<Arc<PolicyDocument>>,
    shutdown: CancellationToken,
) {
    let in_force = tx.borrow().clone();
    let initial = decide(stored.borrow_and_update().as_deref(), &fallback, None)
        .unwrap_or_else(|| fallback.clone());
    if *in_force != initial {
        tx.send_replace(Arc::new(initial));
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = stored.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            let in_force = tx.borrow().clone();
            if let Some(next) = decide(
                stored.borrow_and_update().as_deref(),
                &fallback,
                Some(&in_force),
            ) {
                tx.send_replace(Arc::new(next));
            }
        }
    });
}

/// The policy to apply for a stored value, or `None` to keep the one in force.
fn decide(
    stored: Option<&[u8]>,
    fallback: &PolicyDocument,
    in_force: Option<&PolicyDocument>,
) -> Option<PolicyDocument> {
    let next = match stored {
        None => {
            info!("no routing policy stored; using the built-in default");
            fallback.clone()
        }
        Some(bytes) => match PolicyDocument::from_json(bytes) {
            Ok(doc) => doc,
            Err(error) => {
                warn!(%error, "routing policy rejected; the previous policy stays in force");
                return None;
            }
        },
    };
    if in_force == Some(&next) {
        return None;
    }
    info!(
        rules = next.rules.len(),
        tenants = next.tenants.len(),
        default_lane = next.default_lane.as_str(),
        "routing policy applied"
    );
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::document::LaneName;
    use switchyard_cluster::MemoryRegistry;

    #[tokio::test]
    async fn applies_valid_documents_and_keeps_the_last_good_one() {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        let mut handle = follow(
            &registry,
            PolicyDocument::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(handle.current().default_lane, LaneName::CostSensitive);

        registry
            .put_policy(br#"{"default_lane": "latency-critical"}"#.to_vec(), None)
            .await
            .unwrap();
        assert!(handle.changed().await);
        assert_eq!(handle.current().default_lane, LaneName::LatencyCritical);

        // Invalid, then valid: only the valid one is applied.
        registry
            .put_policy(br#"{"placement": {"choices": 0}}"#.to_vec(), None)
            .await
            .unwrap();
        registry
            .put_policy(
                br#"{"default_lane": "cost-sensitive", "max_queued": 7}"#.to_vec(),
                None,
            )
            .await
            .unwrap();
        assert!(handle.changed().await);
        assert_eq!(handle.current().max_queued, 7);
    }

    #[test]
    fn an_invalid_document_keeps_the_policy_in_force() {
        let fallback = PolicyDocument::default();
        assert_eq!(decide(Some(b"{not json"), &fallback, Some(&fallback)), None);
        assert_eq!(decide(None, &fallback, Some(&fallback)), None);
        let mut lc = fallback.clone();
        lc.default_lane = LaneName::LatencyCritical;
        assert_eq!(
            decide(Some(lc.to_json().as_bytes()), &fallback, Some(&fallback)),
            Some(lc)
        );
    }
}
