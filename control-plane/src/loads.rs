//! Live load of every worker, for stats and the dashboard. Load never goes through etcd (it
//! changes too fast): like a router, the control plane opens a `Worker.Serve` stream to each
//! registered worker — it sends no requests on it — and keeps the `Load` frames the worker
//! piggy-backs (its total load across all routers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_cluster::credential::ClusterToken;
use switchyard_cluster::identity::IdentityMismatch;
use switchyard_cluster::tls::ClientTls;
use switchyard_cluster::{Membership, Pool};
use switchyard_proto::v1::{self, worker_client::WorkerClient, worker_frame::Frame};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::events::Events;

/// Pause before reconnecting to a worker whose stream failed.
const RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// Last load reported by each connected worker, by worker id.
#[derive(Debug, Clone, Default)]
pub struct Loads {
    by_worker: Arc<Mutex<HashMap<String, v1::Load>>>,
    /// The cluster token presented to workers.
    credential: Option<ClusterToken>,
    /// TLS of the load streams (workers serve TLS).
    tls: Option<ClientTls>,
    /// Where a record refused for its certificate's identity is reported.
    events: Option<Events>,
}

impl Loads {
    /// The worker's last report; `None` while no stream to it is up.
    pub fn get(&self, worker_id: &str) -> Option<v1::Load> {
        self.by_worker
            .lock()
            .expect("loads lock")
            .get(worker_id)
            .copied()
    }

    fn set(&self, worker_id: &str, load: Option<v1::Load>) {
        let mut map = self.by_worker.lock().expect("loads lock");
        match load {
            Some(load) => map.insert(worker_id.to_string(), load),
            None => map.remove(worker_id),
        };
    }

    /// Follows the membership: one load stream per registered worker, until `shutdown`.
    pub fn spawn(
        mut membership: Membership,
        credential: Option<ClusterToken>,
        tls: Option<ClientTls>,
        events: Events,
        shutdown: CancellationToken,
    ) -> Self {
        let loads = Self {
            credential,
            tls,
            events: Some(events),
            ..Self::default()
        };
        let this = loads.clone();
        tokio::spawn(async move {
            // Worker id → (address and pool followed, task): the stream checked that identity.
            let mut followed: HashMap<String, ((String, Pool), JoinHandle<()>)> = HashMap::new();
            loop {
                let view = membership.current();
                followed.retain(|id, (followed, task)| {
                    let keep = view
                        .get(id)
                        .is_some_and(|w| (&w.address, w.pool) == (&followed.0, followed.1));
                    if !keep {
                        task.abort();
                        this.set(id, None);
                    }
                    keep
                });
                for worker in view.iter() {
                    if !followed.contains_key(&worker.id) {
                        let task = tokio::spawn(follow(
                            this.clone(),
                            worker.id.clone(),
                            worker.pool,
                            worker.address.clone(),
                        ));
                        followed.insert(
                            worker.id.clone(),
                            ((worker.address.clone(), worker.pool), task),
                        );
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    alive = membership.changed() => if !alive { break },
                }
            }
            for (_, (_, task)) in followed {
                task.abort();
            }
        });
        loads
    }
}

async fn follow(loads: Loads, worker_id: String, pool: Pool, address: String) {
    // One event per record and address: the retries every second would flood the feed.
    let mut reported = false;
    loop {
        if let Err(error) = stream_loads(&loads, &worker_id, pool, &address).await {
            match error.downcast_ref::<IdentityMismatch>() {
                Some(mismatch) if !reported => {
                    reported = true;
                    warn!(%worker_id, %pool, %address, %mismatch, "worker record refused");
                    if let Some(events) = &loads.events {
                        events.identity_rejected(&worker_id, pool, &address, &mismatch.to_string());
                    }
                }
                _ => debug!(%worker_id, %address, %error, "load stream failed; reconnecting"),
            }
        }
        loads.set(&worker_id, None);
        tokio::time::sleep(RECONNECT_BACKOFF).await;
    }
}

async fn stream_loads(
    loads: &Loads,
    worker_id: &str,
    pool: Pool,
    address: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Like a router's link: only to a certificate naming the record's worker.
    let expected = switchyard_cluster::identity::worker_uri(pool, worker_id);
    let (endpoint, check) = match &loads.tls {
        Some(tls) => {
            let (endpoint, check) = switchyard_cluster::identity::endpoint(address, tls, expected)?;
            (endpoint, Some(check))
        }
        None => (switchyard_cluster::tls::endpoint(address, None)?, None),
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(error) => {
            return Err(match check.and_then(|c| c.take_rejection()) {
                Some(mismatch) => Box::new(mismatch),
                None => Box::new(error),
            });
        }
    };
    let mut client = WorkerClient::new(channel);
    // The outbound half stays open and empty: this stream only listens.
    let mut outbound = tonic::Request::new(futures::stream::pending::<v1::RouterFrame>());
    if let Some(credential) = &loads.credential {
        credential.apply(&mut outbound);
    }
    let mut inbound = client.serve(outbound).await?.into_inner();
    while let Some(frame) = inbound.message().await? {
        if let Some(Frame::Load(load)) = frame.frame {
            loads.set(worker_id, Some(load));
        }
    }
    Ok(())
}
