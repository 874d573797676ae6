//! Router replicas announce themselves in a real etcd (`routers/<id>` on a lease) and find each
//! other by id.

mod support;

use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use support::Etcd;
use switchyard_cluster::schema::router_key;
use switchyard_cluster::{Registry, RegistryError, RouterRecord};

/// Each step that waits for etcd gives up after this (a lost event fails the test).
const STEP: Duration = Duration::from_secs(20);

fn router(id: &str, grpc_address: &str) -> RouterRecord {
    RouterRecord {
        id: id.into(),
        grpc_address: grpc_address.into(),
    }
}

/// Watches `key` from the store's current revision on.
async fn watch_key(client: &mut etcd_client::Client, key: &str) -> WatchStream {
    let revision = client
        .get(key, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client
        .watch(
            key,
            Some(WatchOptions::new().with_start_revision(revision + 1)),
        )
        .await
        .unwrap()
}

/// The next event on `stream`: its type and, for a put, the value's lease.
async fn next_event(stream: &mut WatchStream) -> (EventType, i64) {
    tokio::time::timeout(STEP, async {
        loop {
            let response = stream.message().await.unwrap().expect("the watch ended");
            if let Some(event) = response.events().first() {
                let lease = event.kv().map(|kv| kv.lease()).unwrap_or_default();
                return (event.event_type(), lease);
            }
        }
    })
    .await
    .expect("no event on the watched key")
}

/// The lease the record of `router_id` is stored on.
async fn lease_of(client: &mut etcd_client::Client, router_id: &str) -> Option<i64> {
    let read = client.get(router_key(router_id), None).await.unwrap();
    read.kvs().first().map(|kv| kv.lease())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_finds_another_by_id_until_it_withdraws() {
    let etcd = Etcd::start().await;
    let announcer = etcd.registry().await;
    let finder = etcd.registry().await;
    let record = router("router-7d9f-a", "10.1.2.3:8080");
    let presence = announcer
        .announce_router(record.clone(), Duration::from_secs(5))
        .await
        .unwrap();
    // Found through another client, as another replica finds it.
    assert_eq!(
        finder.find_router("router-7d9f-a").await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(finder.find_router("router-other").await.unwrap(), None);
    assert_eq!(
        finder.list_routers().await.unwrap(),
        std::slice::from_ref(&record)
    );
    // Ids no replica can announce are not running (a client's made-up response id).
    assert_eq!(finder.find_router("").await.unwrap(), None);
    assert_eq!(finder.find_router("a/b").await.unwrap(), None);
    // Stored on a lease, under the documented key.
    let mut client = etcd.client().await;
    assert!(lease_of(&mut client, "router-7d9f-a").await.unwrap() != 0);

    presence.withdraw().await.unwrap();
    assert_eq!(finder.find_router("router-7d9f-a").await.unwrap(), None);
    assert_eq!(finder.list_routers().await.unwrap(), []);
    assert_eq!(lease_of(&mut client, "router-7d9f-a").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_presence_removes_the_record() {
    let etcd = Etcd::start().await;
    let registry = etcd.registry().await;
    let mut client = etcd.client().await;
    let presence = registry
        .announce_router(router("router-a", "10.1.2.3:8080"), Duration::from_secs(30))
        .await
        .unwrap();
    let mut events = watch_key(&mut client, &router_key("router-a")).await;
    drop(presence);
    // Long before its 30 s lease would have expired.
    assert_eq!(next_event(&mut events).await.0, EventType::Delete);
    assert_eq!(registry.find_router("router-a").await.unwrap(), None);
}

/// The record's lease revoked behind the replica's back (as when etcd expired it while the
/// replica was cut off): the replica announces itself again, on a new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_comes_back_after_its_lease_is_revoked() {
    let etcd = Etcd::start().await;
    let registry = etcd.registry().await;
    let mut client = etcd.client().await;
    let record = router("router-a", "10.1.2.3:8080");
    let presence = registry
        .announce_router(record.clone(), Duration::from_secs(3))
        .await
        .unwrap();
    let first = lease_of(&mut client, "router-a").await.unwrap();
    let mut events = watch_key(&mut client, &router_key("router-a")).await;

    client.lease_revoke(first).await.unwrap();
    assert_eq!(next_event(&mut events).await.0, EventType::Delete);
    let (event, second) = next_event(&mut events).await;
    assert_eq!(event, EventType::Put);
    assert_ne!(second, first);
    assert_eq!(
        registry.find_router("router-a").await.unwrap(),
        Some(record)
    );

    // The new lease is the one kept alive, and withdrawn.
    presence.withdraw().await.unwrap();
    assert_eq!(next_event(&mut events).await.0, EventType::Delete);
    let ttl = client.lease_time_to_live(second, None).await.unwrap().ttl();
    assert!(ttl <= 0, "the withdrawn lease lives on ({ttl} s)");
}

/// etcd unreachable for longer than the lease's TTL (frozen): the replica keeps trying, and
/// once etcd answers again its record is back, on a new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_comes_back_after_etcd_was_unreachable_past_its_ttl() {
    let etcd = Etcd::start().await;
    let registry = etcd.registry().await;
    let mut client = etcd.client().await;
    let record = router("router-a", "10.1.2.3:8080");
    let presence = registry
        .announce_router(record.clone(), Duration::from_secs(1))
        .await
        .unwrap();
    let first = lease_of(&mut client, "router-a").await.unwrap();
    let mut events = watch_key(&mut client, &router_key("router-a")).await;

    etcd.pause();
    // The outage itself (not a wait for an event): three TTLs, so the lease runs out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.resume();

    // etcd expires the old lease (a delete) and the replica announces itself again (a put on
    // a new lease), in either order: the record may have moved to the new lease first.
    let again = tokio::time::timeout(STEP, async {
        loop {
            let (event, lease) = next_event(&mut events).await;
            if event == EventType::Put && lease != first {
                return lease;
            }
        }
    })
    .await
    .expect("the record never came back");
    assert_eq!(lease_of(&mut client, "router-a").await, Some(again));
    assert_eq!(
        registry.find_router("router-a").await.unwrap(),
        Some(record)
    );
    presence.withdraw().await.unwrap();
}

/// A second live replica under an id already announced is refused, naming the holder, after
/// waiting a lease TTL for the holder to let go; the first keeps its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_held_by_a_live_replica_is_refused() {
    let etcd = Etcd::start().await;
    let registry = etcd.registry().await;
    let ttl = Duration::from_secs(1);
    let _first = registry
        .announce_router(router("router-a", "10.1.2.3:8080"), ttl)
        .await
        .unwrap();
    let twin = etcd.registry().await;
    match twin
        .announce_router(router("router-a", "10.9.9.9:8080"), ttl)
        .await
    {
        Err(RegistryError::RouterIdTaken { id, holder }) => {
            assert_eq!(id, "router-a");
            assert!(holder.contains("10.1.2.3:8080"), "{holder}");
        }
        other => panic!(
            "a second live replica announced itself: {:?}",
            other.map(drop)
        ),
    }
    assert_eq!(
        twin.find_router("router-a").await.unwrap(),
        Some(router("router-a", "10.1.2.3:8080"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_and_sub_second_ttls_are_refused_before_etcd_is_asked() {
    let etcd = Etcd::start().await;
    let registry = etcd.registry().await;
    for id in [String::new(), "a/b".into(), "r".repeat(254)] {
        let error = registry
            .announce_router(router(&id, "10.1.2.3:8080"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(&error, RegistryError::Config(_)), "{error}");
    }
    let error = registry
        .announce_router(
            router("router-a", "10.1.2.3:8080"),
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RegistryError::InvalidTtl(_)), "{error}");
    let mut client = etcd.client().await;
    let all = client
        .get(
            "/switchyard/v1/routers/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(all.kvs().is_empty());
}
