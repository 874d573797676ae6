//! In-memory registry for single-process mode (`switchyard up` without etcd): the same
//! contract as etcd, without leases — a record lives until deregistered or its handle dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::membership::{Membership, MembershipView};
use crate::registry::{
    Command, Fence, Registration, Registry, RegistryError, RouterPresence, check_router_id,
};
use crate::schema::{RouterRecord, WorkerRecord};

/// Announced router replicas by id, each with the number of the announcement that holds it.
type Routers = BTreeMap<String, (u64, RouterRecord)>;

#[derive(Debug, Clone)]
pub struct MemoryRegistry {
    view: Arc<watch::Sender<Arc<MembershipView>>>,
    policy: Arc<watch::Sender<Option<Vec<u8>>>>,
    /// Drain request per worker id; an entry exists once anyone set or watched it.
    drains: Arc<Mutex<BTreeMap<String, watch::Sender<bool>>>>,
    /// The standalone control plane's record, once it announced itself.
    control_plane: Arc<watch::Sender<Option<Vec<u8>>>>,
    /// Announced router replicas (a channel, so that tests can await a change).
    routers: Arc<watch::Sender<Routers>>,
    /// Numbers the router announcements.
    announcements: Arc<AtomicU64>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        let (tx, _) = watch::channel(Arc::new(MembershipView::default()));
        let (policy, _) = watch::channel(None);
        let (control_plane, _) = watch::channel(None);
        let (routers, _) = watch::channel(Routers::new());
        Self {
            view: Arc::new(tx),
            policy: Arc::new(policy),
            drains: Arc::default(),
            control_plane: Arc::new(control_plane),
            routers: Arc::new(routers),
            announcements: Arc::default(),
        }
    }
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `change` under the channel's write lock: concurrent registrations must not
    /// read the same snapshot and overwrite each other's update.
    fn modify(&self, change: impl FnOnce(&mut MembershipView)) {
        self.view.send_if_modified(|current| {
            let mut view = MembershipView::clone(current);
            change(&mut view);
            let changed = view != **current;
            if changed {
                *current = Arc::new(view);
            }
            changed
        });
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    fn describe(&self) -> String {
        "the in-memory registry".into()
    }

    async fn register(
        &self,
        record: WorkerRecord,
        ttl: Duration,
    ) -> Result<Registration, RegistryError> {
        if ttl < Duration::from_secs(1) {
            return Err(RegistryError::InvalidTtl(ttl));
        }
        self.modify(|v| v.upsert(record.clone()));
        let (tx, mut rx) = mpsc::channel(8);
        let registry = self.clone();
        tokio::spawn(async move {
            let id = record.id.clone();
            loop {
                match rx.recv().await {
                    Some(Command::Update(new_record, reply)) => {
                        registry.modify(|v| v.upsert(new_record));
                        let _ = reply.send(Ok(()));
                    }
                    Some(Command::Deregister(reply)) => {
                        registry.modify(|v| drop(v.remove(&id)));
                        let _ = reply.send(Ok(()));
                        return;
                    }
                    None => {
                        registry.modify(|v| drop(v.remove(&id)));
                        return;
                    }
                }
            }
        });
        Ok(Registration::new(tx))
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>, RegistryError> {
        Ok(self.view.borrow().iter().cloned().collect())
    }

    async fn watch_workers(&self) -> Result<Membership, RegistryError> {
        Ok(Membership::new(self.view.subscribe()))
    }

    async fn get_policy(&self) -> Result<Option<Vec<u8>>, RegistryError> {
        Ok(self.policy.borrow().clone())
    }

    /// One process, no election: fences always hold.
    async fn put_policy(
        &self,
        document: Vec<u8>,
        _fence: Option<&Fence>,
    ) -> Result<(), RegistryError> {
        self.policy.send_replace(Some(document));
        Ok(())
    }

    async fn watch_policy(&self) -> Result<watch::Receiver<Option<Vec<u8>>>, RegistryError> {
        Ok(self.policy.subscribe())
    }

    async fn set_drain(
        &self,
        worker_id: &str,
        drain: bool,
        _fence: Option<&Fence>,
    ) -> Result<bool, RegistryError> {
        let mut drains = self.drains.lock().expect("drains lock");
        let sender = drains
            .entry(worker_id.to_string())
            .or_insert_with(|| watch::channel(false).0);
        Ok(sender.send_replace(drain))
    }

    async fn list_drains(&self) -> Result<Vec<String>, RegistryError> {
        let drains = self.drains.lock().expect("drains lock");
        Ok(drains
            .iter()
            .filter(|(_, s)| *s.borrow())
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn watch_drain(&self, worker_id: &str) -> Result<watch::Receiver<bool>, RegistryError> {
        let mut drains = self.drains.lock().expect("drains lock");
        Ok(drains
            .entry(worker_id.to_string())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe())
    }

    async fn watch_control_plane(&self) -> Result<watch::Receiver<Option<Vec<u8>>>, RegistryError> {
        Ok(self.control_plane.subscribe())
    }

    async fn announce_standalone_control_plane(
        &self,
        record: Option<Vec<u8>>,
    ) -> Result<(), RegistryError> {
        self.control_plane.send_replace(record);
        Ok(())
    }

    /// One process, no leases: the record lives until withdrawn or its presence dropped. A
    /// second announcement of an id replaces the first, whose withdrawal then leaves it.
    async fn announce_router(
        &self,
        record: RouterRecord,
        ttl: Duration,
    ) -> Result<RouterPresence, RegistryError> {
        check_router_id(&record.id)?;
        if ttl < Duration::from_secs(1) {
            return Err(RegistryError::InvalidTtl(ttl));
        }
        let id = record.id.clone();
        let number = self.announcements.fetch_add(1, Ordering::Relaxed);
        self.routers.send_modify(|routers| {
            routers.insert(id.clone(), (number, record));
        });
        let routers = self.routers.clone();
        // Removes the record if this announcement still holds it.
        let remove = move || {
            routers.send_if_modified(|routers| {
                let ours = routers.get(&id).is_some_and(|(n, _)| *n == number);
                if ours {
                    routers.remove(&id);
                }
                ours
            });
        };
        let (tx, mut rx) = mpsc::channel::<Command<RouterRecord>>(8);
        tokio::spawn(async move {
            // A presence is withdrawn or dropped, never updated.
            while let Some(command) = rx.recv().await {
                match command {
                    Command::Update(_, reply) => drop(reply),
                    Command::Deregister(reply) => {
                        remove();
                        let _ = reply.send(Ok(()));
                        return;
                    }
                }
            }
            remove();
        });
        Ok(RouterPresence::new(tx))
    }

    async fn find_router(&self, router_id: &str) -> Result<Option<RouterRecord>, RegistryError> {
        Ok(self
            .routers
            .borrow()
            .get(router_id)
            .map(|(_, record)| record.clone()))
    }

    async fn list_routers(&self) -> Result<Vec<RouterRecord>, RegistryError> {
        let mut records: Vec<RouterRecord> = self
            .routers
            .borrow()
            .values()
            .map(|(_, record)| record.clone())
            .collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Capacity, Pool, WorkerState};

    fn record(id: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            pool: Pool::Gpu,
            address: "127.0.0.1:1".into(),
            models: vec!["m".into()],
            capacity: Capacity {
                max_concurrent: 1,
                tokens_per_s: 1.0,
                cost_per_mtok: 1.0,
            },
            hardware: String::new(),
            engine: "synthetic".into(),
            version: String::new(),
            state: WorkerState::Ready,
            scores_prompts: false,
            embeds: false,
        }
    }

    #[tokio::test]
    async fn register_update_deregister_are_seen_by_watchers() {
        let registry = MemoryRegistry::new();
        let mut membership = registry.watch_workers().await.unwrap();
        let registration = registry
            .register(record("a"), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(membership.current().get("a").is_some());

        let mut draining = record("a");
        draining.state = WorkerState::Draining;
        registration.update(draining).await.unwrap();
        assert!(membership.changed().await);
        assert_eq!(
            membership.current().get("a").unwrap().state,
            WorkerState::Draining
        );

        registration.deregister().await.unwrap();
        assert!(registry.list_workers().await.unwrap().is_empty());
        assert!(membership.current().workers.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_registrations_are_all_kept() {
        let registry = MemoryRegistry::new();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let registry = registry.clone();
                tokio::spawn(async move {
                    registry
                        .register(record(&format!("w{i}")), Duration::from_secs(5))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut registrations = Vec::new();
        for task in tasks {
            registrations.push(task.await.unwrap());
        }
        assert_eq!(registry.list_workers().await.unwrap().len(), 64);
    }

    #[tokio::test]
    async fn dropping_the_handle_withdraws_the_record() {
        let registry = MemoryRegistry::new();
        let mut membership = registry.watch_workers().await.unwrap();
        let registration = registry
            .register(record("a"), Duration::from_secs(5))
            .await
            .unwrap();
        drop(registration);
        while membership.current().get("a").is_some() {
            assert!(membership.changed().await);
        }
    }

    #[tokio::test]
    async fn drain_requests_are_stored_listed_and_watched() {
        let registry = MemoryRegistry::new();
        let mut drain = registry.watch_drain("a").await.unwrap();
        assert!(!*drain.borrow());
        assert!(!registry.set_drain("a", true, None).await.unwrap());
        assert!(drain.changed().await.is_ok() && *drain.borrow_and_update());
        assert!(registry.set_drain("a", true, None).await.unwrap());
        assert_eq!(registry.list_drains().await.unwrap(), vec!["a"]);
        assert!(registry.set_drain("a", false, None).await.unwrap());
        assert!(drain.changed().await.is_ok() && !*drain.borrow());
        assert!(registry.list_drains().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn sub_second_ttl_is_refused() {
        let registry = MemoryRegistry::new();
        let err = registry
            .register(record("a"), Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::InvalidTtl(_)));
    }

    fn router(id: &str, grpc_address: &str) -> RouterRecord {
        RouterRecord {
            id: id.into(),
            grpc_address: grpc_address.into(),
        }
    }

    #[tokio::test]
    async fn an_announced_router_is_found_until_withdrawn() {
        let registry = MemoryRegistry::new();
        let presence = registry
            .announce_router(router("router-a", "10.0.0.1:8080"), Duration::from_secs(5))
            .await
            .unwrap();
        let _other = registry
            .announce_router(router("router-b", "10.0.0.2:8080"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            registry.find_router("router-a").await.unwrap(),
            Some(router("router-a", "10.0.0.1:8080"))
        );
        assert_eq!(
            registry.find_router("router-b").await.unwrap(),
            Some(router("router-b", "10.0.0.2:8080"))
        );
        assert_eq!(
            registry.list_routers().await.unwrap(),
            [
                router("router-a", "10.0.0.1:8080"),
                router("router-b", "10.0.0.2:8080")
            ]
        );
        presence.withdraw().await.unwrap();
        assert_eq!(registry.find_router("router-a").await.unwrap(), None);
        assert!(registry.find_router("router-b").await.unwrap().is_some());
        assert_eq!(
            registry.list_routers().await.unwrap(),
            [router("router-b", "10.0.0.2:8080")]
        );
    }

    #[tokio::test]
    async fn dropping_a_router_presence_removes_the_record() {
        let registry = MemoryRegistry::new();
        let mut routers = registry.routers.subscribe();
        let presence = registry
            .announce_router(router("router-a", "10.0.0.1:8080"), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(registry.find_router("router-a").await.unwrap().is_some());
        drop(presence);
        while routers.borrow_and_update().contains_key("router-a") {
            routers.changed().await.unwrap();
        }
        assert_eq!(registry.find_router("router-a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_unknown_router_is_not_found() {
        let registry = MemoryRegistry::new();
        assert_eq!(registry.find_router("router-x").await.unwrap(), None);
        assert_eq!(registry.find_router("").await.unwrap(), None);
        assert_eq!(registry.find_router("a/b").await.unwrap(), None);
    }

    /// A replica announced again under its id (replaced) keeps its record when the earlier
    /// announcement's presence goes.
    #[tokio::test]
    async fn an_earlier_announcement_withdrawn_leaves_its_replacement() {
        let registry = MemoryRegistry::new();
        let earlier = registry
            .announce_router(router("router-a", "10.0.0.1:8080"), Duration::from_secs(5))
            .await
            .unwrap();
        let _later = registry
            .announce_router(router("router-a", "10.0.0.9:8080"), Duration::from_secs(5))
            .await
            .unwrap();
        earlier.withdraw().await.unwrap();
        assert_eq!(
            registry.find_router("router-a").await.unwrap(),
            Some(router("router-a", "10.0.0.9:8080"))
        );
    }

    #[tokio::test]
    async fn bad_router_ids_and_sub_second_ttls_are_refused() {
        let registry = MemoryRegistry::new();
        for id in [String::new(), "a/b".into(), "r".repeat(254)] {
            let error = registry
                .announce_router(router(&id, "10.0.0.1:8080"), Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(
                matches!(&error, RegistryError::Config(m) if m.contains("router id")),
                "{error}"
            );
        }
        let error = registry
            .announce_router(
                router("router-a", "10.0.0.1:8080"),
                Duration::from_millis(999),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, RegistryError::InvalidTtl(_)), "{error}");
        assert_eq!(registry.find_router("router-a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_standalone_control_plane_is_announced_to_watchers() {
        let registry = MemoryRegistry::new();
        let mut watch = registry.watch_control_plane().await.unwrap();
        assert_eq!(*watch.borrow_and_update(), None);
        registry
            .announce_standalone_control_plane(Some(b"{\"grpc\":\"127.0.0.1:1\"}".to_vec()))
            .await
            .unwrap();
        watch.changed().await.unwrap();
        assert!(watch.borrow_and_update().is_some());
        // A watcher that starts later sees it too; withdrawing it is seen.
        let late = registry.watch_control_plane().await.unwrap();
        assert!(late.borrow().is_some());
        registry
            .announce_standalone_control_plane(None)
            .await
            .unwrap();
        watch.changed().await.unwrap();
        assert_eq!(*watch.borrow(), None);
    }
}
