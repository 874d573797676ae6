//! Live load of every worker, for stats and the dashboard. Load never goes through etcd (it
//! changes too fast): like a router, the control plane opens a `Worker.Serve` stream to each
//! registered worker — it sends no requests on it — and keeps the `Load` frames the worker
//! piggy-backs (its total load across all routers). A worker it cannot open that stream to
//! (the worker refuses its cluster token, the TLS handshake fails, nothing listens) is kept as
//! [`Unreachable`], with why: it is no ready capacity, whatever its record says.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use switchyard_cluster::credential::ClusterToken;
use switchyard_cluster::identity::IdentityMismatch;
use switchyard_cluster::telemetry::chain_text;
use switchyard_cluster::tls::ClientTls;
use switchyard_cluster::{Membership, Pool};
use switchyard_proto::v1::{self, worker_client::WorkerClient, worker_frame::Frame};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::events::Events;

/// Pause before reconnecting to a worker whose stream failed.
const RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// Why the control plane has no load stream to a worker: the last attempt's error, since when
/// the attempts fail and how many failed in a row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unreachable {
    pub reason: String,
    pub since_unix_ms: u64,
    pub attempts: u32,
}

/// The load stream to one worker. No entry: the first attempt is under way (a worker that just
/// joined is not unreachable for the milliseconds its stream takes to open).
#[derive(Debug, Clone)]
enum Link {
    /// Open; the worker's last report, once one came.
    Up(Option<v1::Load>),
    Down(Unreachable),
}

/// Last load reported by each connected worker, or why there is no stream, by worker id.
#[derive(Debug, Clone, Default)]
pub struct Loads {
    by_worker: Arc<Mutex<HashMap<String, Link>>>,
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
        match self.by_worker.lock().expect("loads lock").get(worker_id) {
            Some(Link::Up(load)) => *load,
            _ => None,
        }
    }

    /// Why there is no stream to the worker; `None` while one is up or being opened.
    pub fn unreachable(&self, worker_id: &str) -> Option<Unreachable> {
        match self.by_worker.lock().expect("loads lock").get(worker_id) {
            Some(Link::Down(down)) => Some(down.clone()),
            _ => None,
        }
    }

    fn set(&self, worker_id: &str, link: Option<Link>) -> Option<Link> {
        let mut map = self.by_worker.lock().expect("loads lock");
        match link {
            Some(link) => map.insert(worker_id.to_string(), link),
            None => map.remove(worker_id),
        }
    }

    /// The stream to the worker is open; returns why it was down before, if it was.
    fn connected(&self, worker_id: &str) -> Option<Unreachable> {
        match self.set(worker_id, Some(Link::Up(None))) {
            Some(Link::Down(down)) => Some(down),
            _ => None,
        }
    }

    /// An attempt failed (or the open stream broke) for `reason`; `true` when the stream was
    /// not already failing: the one time it is worth a warning.
    fn failed(&self, worker_id: &str, reason: String) -> bool {
        let mut map = self.by_worker.lock().expect("loads lock");
        match map.get_mut(worker_id) {
            Some(Link::Down(down)) => {
                down.reason = reason;
                down.attempts += 1;
                false
            }
            _ => {
                let since_unix_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let down = Unreachable {
                    reason,
                    since_unix_ms,
                    attempts: 1,
                };
                map.insert(worker_id.to_string(), Link::Down(down));
                true
            }
        }
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
    // A record coming back (or moving) starts afresh: its failures are counted and logged anew.
    loads.set(&worker_id, None);
    // One event per record and address: the retries every second would flood the feed.
    let mut reported = false;
    loop {
        // A refused identity's own line, when given, is this failure's warning.
        let mut warned = false;
        let reason = match stream_loads(&loads, &worker_id, pool, &address).await {
            Ok(()) => {
                // The worker closed it (it is stopping, and deregisters next): no failure.
                debug!(%worker_id, %address, "the worker ended its load stream; reconnecting");
                loads.set(&worker_id, None);
                tokio::time::sleep(RECONNECT_BACKOFF).await;
                continue;
            }
            Err(error) => match error.downcast_ref::<IdentityMismatch>() {
                Some(mismatch) => {
                    if !reported {
                        reported = true;
                        warned = true;
                        warn!(%worker_id, %pool, %address, %mismatch, "worker record refused");
                        if let Some(events) = &loads.events {
                            let message = mismatch.to_string();
                            events.identity_rejected(&worker_id, pool, &address, &message);
                        }
                    }
                    format!("TLS: worker identity refused: {mismatch}")
                }
                None => chain_text(error.as_ref()),
            },
        };
        // Logged when the stream starts failing, not on each retry (every second).
        if loads.failed(&worker_id, reason.clone()) && !warned {
            warn!(%worker_id, %pool, %address, %reason, "load stream to worker failing; it counts as unreachable, retrying every second");
        } else {
            debug!(%worker_id, %address, %reason, "load stream failed again; reconnecting");
        }
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
    // The outbound half stays open and empty (this stream only listens) until this future is
    // dropped — the worker's record gone or changed — and ends with it: the HTTP/2 stream
    // (and so the connection) ends with its request body, which a body that never ends held
    // open after the task following it was aborted, one more each time a record came back.
    let (_open, outbound) = tokio::sync::mpsc::channel::<v1::RouterFrame>(1);
    let mut outbound = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
    if let Some(credential) = &loads.credential {
        credential.apply(&mut outbound);
    }
    let mut inbound = client.serve(outbound).await?.into_inner();
    // The worker took the call (token and certificate): it is reachable from here on.
    if let Some(down) = loads.connected(worker_id) {
        info!(%worker_id, %address, failed_attempts = down.attempts, "load stream to worker working again");
    }
    while let Some(frame) = inbound.message().await? {
        if let Some(Frame::Load(load)) = frame.frame {
            loads.set(worker_id, Some(Link::Up(Some(load))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_stream_is_reported_once_until_it_works_again() {
        let loads = Loads::default();
        // The first attempt is under way: neither load nor unreachable.
        assert_eq!(
            (loads.get("gpu-0"), loads.unreachable("gpu-0")),
            (None, None)
        );
        assert!(loads.failed(
            "gpu-0",
            "Unauthenticated: cluster token not recognised".into()
        ));
        assert!(!loads.failed(
            "gpu-0",
            "Unauthenticated: cluster token not recognised".into()
        ));
        let down = loads.unreachable("gpu-0").expect("unreachable");
        assert_eq!(down.attempts, 2);
        assert!(down.reason.contains("not recognised"), "{down:?}");

        // Reachable again: no longer unreachable, even before its first load report.
        assert_eq!(loads.connected("gpu-0").map(|d| d.attempts), Some(2));
        assert_eq!(
            (loads.get("gpu-0"), loads.unreachable("gpu-0")),
            (None, None)
        );
        let load = v1::Load {
            active: 3,
            ..Default::default()
        };
        loads.set("gpu-0", Some(Link::Up(Some(load))));
        assert_eq!(loads.get("gpu-0").map(|l| l.active), Some(3));

        // A stream that breaks later is a new failure, worth its own warning.
        assert!(loads.failed("gpu-0", "Unknown: h2 protocol error: stream reset".into()));
        assert_eq!(loads.get("gpu-0"), None);
        assert_eq!(loads.unreachable("gpu-0").map(|d| d.attempts), Some(1));
    }
}
