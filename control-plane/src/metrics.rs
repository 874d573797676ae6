//! The control plane's Prometheus metrics: the cluster's workers by pool and state, as the
//! registry's membership watch sees them; router report entries dropped as malformed.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use switchyard_cluster::telemetry::metrics::Metrics;
use switchyard_cluster::{Membership, MembershipView, Pool, WorkerState};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub pool: &'static str,
    pub state: &'static str,
}

/// Which part of a router's report was dropped: `decision`, `outcome`, `stats`,
/// `stats.lanes`, `stats.ledger` or `empty`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReportDropLabels {
    pub entry: &'static str,
}

/// Why a router's (well-formed) report was not kept: `not_leader` (this replica does not
/// lead, or its lease ran out while it was stalled) or `late` (a second's stats delivered late).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReportIgnoreLabels {
    pub reason: &'static str,
}

/// Registers the count of router report entries dropped (`family`, kept by the insights).
pub fn register_report_drops(metrics: &Metrics, family: Family<ReportDropLabels, Counter>) {
    metrics.register(|r| {
        r.register(
            "switchyard_control_plane_report_entries_dropped",
            "Entries of routers' reports dropped as malformed (the rest of each stream is kept), by entry",
            family,
        )
    });
}

/// Registers the count of router reports not kept (`family`, kept by the insights), every
/// reason at 0 from the start.
pub fn register_report_ignores(metrics: &Metrics, family: Family<ReportIgnoreLabels, Counter>) {
    for reason in crate::reports::Ignored::ALL {
        let _ = family.get_or_create(&ReportIgnoreLabels {
            reason: reason.as_str(),
        });
    }
    metrics.register(|r| {
        r.register(
            "switchyard_control_plane_report_entries_ignored",
            "Routers' reports not kept, by reason: not_leader (this replica does not lead, or its lease ran out while it was stalled), late (a second's stats delivered late, as after a freeze)",
            family,
        )
    });
}

const POOLS: [Pool; 2] = [Pool::Gpu, Pool::Wse];
const STATES: [WorkerState; 2] = [WorkerState::Ready, WorkerState::Draining];

fn pool_label(pool: Pool) -> &'static str {
    match pool {
        Pool::Gpu => "gpu",
        Pool::Wse => "wse",
    }
}

#[derive(Clone)]
pub struct ControlPlaneMetrics {
    pub workers: Family<WorkerLabels, Gauge>,
}

impl std::fmt::Debug for ControlPlaneMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneMetrics")
            .finish_non_exhaustive()
    }
}

impl ControlPlaneMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let this = Self {
            workers: Family::default(),
        };
        metrics.register(|r| {
            r.register(
                "switchyard_control_plane_workers",
                "Registered workers, by pool and state",
                this.workers.clone(),
            )
        });
        this
    }

    /// Sets every (pool, state) series, zeros included, from `view`.
    pub fn observe(&self, view: &MembershipView) {
        for pool in POOLS {
            for state in STATES {
                let count = view
                    .iter()
                    .filter(|w| w.pool == pool && w.state == state)
                    .count();
                self.workers
                    .get_or_create(&WorkerLabels {
                        pool: pool_label(pool),
                        state: state.as_str(),
                    })
                    .set(count as i64);
            }
        }
    }

    /// Follows `membership` until `shutdown` fires or the watch ends.
    pub async fn follow(self, mut membership: Membership, shutdown: CancellationToken) {
        loop {
            self.observe(&membership.current());
            tokio::select! {
                alive = membership.changed() => if !alive { return },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
