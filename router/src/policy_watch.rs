//! Keeps a router's routing policy current: follows the `policy` key of the cluster store,
//! validates every new document and applies it without restart. An invalid document is
//! rejected (logged with the field at fault) and the last valid policy stays in force; a
//! router that has none — it started while the stored document was invalid — has no policy to
//! route by, and says so ([`PolicyStatus::Missing`]: the router is not ready) until a valid
//! document is stored. No document stored means the router's built-in default.

use std::sync::Arc;

use switchyard_cluster::{Registry, RegistryError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

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

/// What a router knows of its policy, as its follower last judged the stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyStatus {
    /// The stored document is in force (or, none being stored, the built-in default).
    Current,
    /// The stored document was refused (why); the last valid policy stays in force.
    Kept(String),
    /// The stored document was refused (why) and the router has had no valid policy since it
    /// started: it has none to route by (the built-in default would drop the tenant quotas and
    /// lane restrictions its peers enforce).
    Missing(String),
}

/// Starts following the stored policy. `fallback` applies while none is stored; `status` is
/// told what the router's policy is, at once and at every change.
pub async fn follow(
    registry: &Arc<dyn Registry>,
    fallback: PolicyDocument,
    status: impl FnMut(&PolicyStatus) + Send + 'static,
    shutdown: CancellationToken,
) -> Result<PolicyHandle, RegistryError> {
    let stored = registry.watch_policy().await?;
    let (handle, tx) = PolicyHandle::pending(fallback.clone());
    follow_stored(stored, fallback, tx, status, shutdown);
    Ok(handle)
}

/// Applies the stored policy `stored` follows (validated; `fallback` while none is stored) to
/// `tx`, now and at every change until `shutdown` fires, and tells `status` what the router's
/// policy is whenever that changes.
pub fn follow_stored(
    mut stored: watch::Receiver<Option<Vec<u8>>>,
    fallback: PolicyDocument,
    tx: watch::Sender<Arc<PolicyDocument>>,
    mut status: impl FnMut(&PolicyStatus) + Send + 'static,
    shutdown: CancellationToken,
) {
    let mut follower = Follower {
        fallback,
        in_force: None,
        now: PolicyStatus::Current,
        reported: None,
    };
    let value = stored.borrow_and_update().clone();
    if let Some(next) = follower.judge(value.as_deref()) {
        // What the handle shows while pending (the fallback) may be this already.
        let shown = tx.borrow().clone();
        if *shown != next {
            tx.send_replace(Arc::new(next));
        }
    }
    follower.report(&mut status);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = stored.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            let value = stored.borrow_and_update().clone();
            if let Some(next) = follower.judge(value.as_deref()) {
                tx.send_replace(Arc::new(next));
            }
            follower.report(&mut status);
        }
    });
}

/// The follower's memory: the policy in force and what was last reported of it.
struct Follower {
    fallback: PolicyDocument,
    /// The valid policy last applied; `None` until there was one.
    in_force: Option<PolicyDocument>,
    /// What the router's policy is, as of the last document judged.
    now: PolicyStatus,
    /// What `status` was last told.
    reported: Option<PolicyStatus>,
}

impl Follower {
    /// Judges a stored value: the policy to apply, or `None` to keep the one in force (or,
    /// without one, to have none).
    fn judge(&mut self, stored: Option<&[u8]>) -> Option<PolicyDocument> {
        let next = match stored {
            None => {
                info!("no routing policy stored; using the built-in default");
                self.fallback.clone()
            }
            Some(bytes) => match PolicyDocument::from_json(bytes) {
                Ok(doc) => doc,
                Err(problem) => {
                    let why = problem.to_string();
                    if self.in_force.is_some() {
                        warn!(
                            error = %why,
                            "routing policy rejected; the last valid policy stays in force"
                        );
                        self.now = PolicyStatus::Kept(why);
                    } else {
                        error!(
                            error = %why,
                            "routing policy rejected, and this router has no valid routing \
                             policy to keep (it started while the stored one was invalid): it \
                             routes nothing (gRPC health NOT_SERVING, /health 503) until a valid \
                             document is stored (switchyard admin policy set) or the key is \
                             deleted"
                        );
                        self.now = PolicyStatus::Missing(why);
                    }
                    return None;
                }
            },
        };
        self.now = PolicyStatus::Current;
        if self.in_force.as_ref() == Some(&next) {
            return None;
        }
        info!(
            rules = next.rules.len(),
            tenants = next.tenants.len(),
            default_lane = next.default_lane.as_str(),
            "routing policy applied"
        );
        self.in_force = Some(next.clone());
        Some(next)
    }

    /// Tells `status` what the router's policy is, when that changed since it was last told.
    fn report(&mut self, status: &mut impl FnMut(&PolicyStatus)) {
        if self.reported.as_ref() != Some(&self.now) {
            status(&self.now);
            self.reported = Some(self.now.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::document::LaneName;
    use switchyard_cluster::MemoryRegistry;

    /// A status sink for [`follow`] and a receiver of what it was told.
    fn statuses() -> (
        impl FnMut(&PolicyStatus) + Send + 'static,
        watch::Receiver<Option<PolicyStatus>>,
    ) {
        let (tx, rx) = watch::channel(None);
        (
            move |status: &PolicyStatus| drop(tx.send_replace(Some(status.clone()))),
            rx,
        )
    }

    #[tokio::test]
    async fn applies_valid_documents_and_keeps_the_last_good_one() {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        let (sink, mut status) = statuses();
        let mut handle = follow(
            &registry,
            PolicyDocument::default(),
            sink,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(handle.current().default_lane, LaneName::CostSensitive);
        assert_eq!(*status.borrow_and_update(), Some(PolicyStatus::Current));

        registry
            .put_policy(br#"{"default_lane": "latency-critical"}"#.to_vec(), None)
            .await
            .unwrap();
        assert!(handle.changed().await);
        assert_eq!(handle.current().default_lane, LaneName::LatencyCritical);

        // Invalid: the policy in force stays, and the router says it kept it.
        registry
            .put_policy(br#"{"placement": {"choices": 0}}"#.to_vec(), None)
            .await
            .unwrap();
        status.changed().await.unwrap();
        assert!(
            matches!(&*status.borrow_and_update(), Some(PolicyStatus::Kept(why)) if why.contains("placement.choices")),
        );
        assert_eq!(handle.current().default_lane, LaneName::LatencyCritical);
        // Then valid: applied.
        registry
            .put_policy(
                br#"{"default_lane": "cost-sensitive", "max_queued": 7}"#.to_vec(),
                None,
            )
            .await
            .unwrap();
        assert!(handle.changed().await);
        assert_eq!(handle.current().max_queued, 7);
        status.changed().await.unwrap();
        assert_eq!(*status.borrow(), Some(PolicyStatus::Current));
    }

    /// A router that starts while the stored document is invalid has no policy to keep: it
    /// must not route by the built-in default (no quotas, no lane restrictions) as it did.
    #[tokio::test]
    async fn a_router_starting_on_an_invalid_document_has_no_policy_until_a_valid_one() {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        registry
            .put_policy(br#"["latency-critical"]"#.to_vec(), None)
            .await
            .unwrap();
        let (sink, mut status) = statuses();
        let mut handle = follow(
            &registry,
            PolicyDocument::default(),
            sink,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(
            matches!(&*status.borrow_and_update(), Some(PolicyStatus::Missing(why)) if why.contains("JSON object")),
            "{:?}",
            status.borrow()
        );
        registry
            .put_policy(br#"{"max_queued": 9}"#.to_vec(), None)
            .await
            .unwrap();
        status.changed().await.unwrap();
        assert_eq!(*status.borrow_and_update(), Some(PolicyStatus::Current));
        assert!(handle.changed().await);
        assert_eq!(handle.current().max_queued, 9);
        // From now on it has a policy to keep.
        registry
            .put_policy(b"{not json".to_vec(), None)
            .await
            .unwrap();
        status.changed().await.unwrap();
        assert!(matches!(&*status.borrow(), Some(PolicyStatus::Kept(_))));
        assert_eq!(handle.current().max_queued, 9);
    }

    #[test]
    fn no_document_stored_is_the_built_in_default() {
        let fallback = PolicyDocument::default();
        let mut follower = Follower {
            fallback: fallback.clone(),
            in_force: None,
            now: PolicyStatus::Current,
            reported: None,
        };
        assert_eq!(follower.judge(Some(b"[]")), None);
        assert!(matches!(follower.now, PolicyStatus::Missing(_)));
        // The key deleted: the default, a valid policy.
        assert_eq!(follower.judge(None), Some(fallback.clone()));
        assert_eq!(follower.now, PolicyStatus::Current);
        assert_eq!(follower.judge(None), None, "nothing new to apply");
        assert_eq!(follower.judge(Some(b"{not json")), None);
        assert!(matches!(follower.now, PolicyStatus::Kept(_)));
        let mut lc = fallback.clone();
        lc.default_lane = LaneName::LatencyCritical;
        assert_eq!(follower.judge(Some(lc.to_json().as_bytes())), Some(lc));
        assert_eq!(follower.now, PolicyStatus::Current);
    }
}
