//! What routers report (`Admin.Report`): decisions and outcomes feed [`Decisions`], per-second
//! stats feed [`History`], which a ticker seals once a second with the workers' live load and
//! the lanes' SLOs from the stored policy.
//!
//! Routers report to the leader (they follow the leader key), so the leader's dashboard has
//! the history; a follower's starts filling when it takes over.

use std::sync::Arc;
use std::time::Duration;

use switchyard_cluster::{Membership, Pool};
use switchyard_policy::document::{LaneName, PolicyDocument};
use switchyard_proto::v1::{self, router_report::Report};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::decisions::Decisions;
use crate::history::{History, PoolLoad};
use crate::loads::Loads;

/// Bounds on what one report may carry: the feed keeps reports in memory.
const MAX_ID: usize = 256;
const MAX_TEXT: usize = 2048;
const MAX_CANDIDATES: usize = 64;
/// Ledger rows in one second's stats: lanes, pools and a router's bounded tenants, with room
/// for a newer router's larger bound.
const MAX_LEDGER_ROWS: usize = 256;
/// Moves one outcome may list (the policy allows at most 16 per generation).
const MAX_MOVES: usize = 16;

/// The history and the decision feed.
#[derive(Debug, Clone, Default)]
pub struct Insights {
    pub history: Arc<History>,
    pub decisions: Arc<Decisions>,
}

fn too_long(field: &str, value: &str, max: usize) -> Result<(), tonic::Status> {
    if value.len() > max {
        return Err(tonic::Status::invalid_argument(format!(
            "{field}: {} bytes, at most {max}",
            value.len()
        )));
    }
    Ok(())
}

fn known_lane(field: &str, lane: &str) -> Result<(), tonic::Status> {
    if LaneName::ALL.iter().any(|l| l.as_str() == lane) {
        return Ok(());
    }
    Err(tonic::Status::invalid_argument(format!(
        "{field}: unknown lane {lane:?}, expected latency-critical or cost-sensitive"
    )))
}

/// Checks a report before anything of it is kept.
pub fn validate(report: &v1::RouterReport) -> Result<(), tonic::Status> {
    match &report.report {
        None => Err(tonic::Status::invalid_argument(
            "report: empty (expected a decision, an outcome or stats)",
        )),
        Some(Report::Decision(d)) => {
            if d.request_id.is_empty() {
                return Err(tonic::Status::invalid_argument(
                    "decision.request_id: must not be empty",
                ));
            }
            known_lane("decision.lane", &d.lane)?;
            for (field, value) in [
                ("decision.request_id", &d.request_id),
                ("decision.router_id", &d.router_id),
                ("decision.tenant", &d.tenant),
                ("decision.model", &d.model),
                ("decision.lane_detail", &d.lane_detail),
                ("decision.worker_id", &d.worker_id),
            ] {
                too_long(field, value, MAX_ID)?;
            }
            too_long("decision.reason_text", &d.reason_text, MAX_TEXT)?;
            if d.candidates.len() > MAX_CANDIDATES {
                return Err(tonic::Status::invalid_argument(format!(
                    "decision.candidates: {} candidates, at most {MAX_CANDIDATES}",
                    d.candidates.len()
                )));
            }
            for c in &d.candidates {
                too_long("decision.candidates.worker_id", &c.worker_id, MAX_ID)?;
            }
            Ok(())
        }
        Some(Report::Outcome(o)) => {
            if o.request_id.is_empty() {
                return Err(tonic::Status::invalid_argument(
                    "outcome.request_id: must not be empty",
                ));
            }
            too_long("outcome.request_id", &o.request_id, MAX_ID)?;
            too_long("outcome.worker_id", &o.worker_id, MAX_ID)?;
            too_long(
                "outcome.best_alternative_worker_id",
                &o.best_alternative_worker_id,
                MAX_ID,
            )?;
            too_long("outcome.error", &o.error, MAX_TEXT)?;
            if o.moves.len() > MAX_MOVES {
                return Err(tonic::Status::invalid_argument(format!(
                    "outcome.moves: {} moves, at most {MAX_MOVES}",
                    o.moves.len()
                )));
            }
            for m in &o.moves {
                for (field, value) in [
                    ("outcome.moves.from_worker_id", &m.from_worker_id),
                    ("outcome.moves.from_pool", &m.from_pool),
                    ("outcome.moves.to_worker_id", &m.to_worker_id),
                    ("outcome.moves.to_pool", &m.to_pool),
                    ("outcome.moves.reason", &m.reason),
                ] {
                    too_long(field, value, MAX_ID)?;
                }
            }
            Ok(())
        }
        Some(Report::Stats(s)) => {
            too_long("stats.router_id", &s.router_id, MAX_ID)?;
            for lane in &s.lanes {
                known_lane("stats.lanes.lane", &lane.lane)?;
            }
            if s.ledger.len() > MAX_LEDGER_ROWS {
                return Err(tonic::Status::invalid_argument(format!(
                    "stats.ledger: {} rows, at most {MAX_LEDGER_ROWS}",
                    s.ledger.len()
                )));
            }
            for row in &s.ledger {
                too_long("stats.ledger.key", &row.key, MAX_ID)?;
                match row.dimension.as_str() {
                    "lane" => known_lane("stats.ledger.key", &row.key)?,
                    "pool" | "tenant" => {}
                    other => {
                        return Err(tonic::Status::invalid_argument(format!(
                            "stats.ledger.dimension: unknown {other:?}, expected lane, pool or tenant"
                        )));
                    }
                }
            }
            Ok(())
        }
    }
}

impl Insights {
    /// Keeps a validated report from router `router_id` (the router of its stream).
    pub fn ingest(&self, router_id: &mut String, report: v1::RouterReport) {
        match report.report {
            Some(Report::Decision(decision)) => {
                router_id.clone_from(&decision.router_id);
                self.decisions.add(decision);
            }
            Some(Report::Outcome(outcome)) => self.decisions.complete(router_id, outcome),
            Some(Report::Stats(stats)) => {
                router_id.clone_from(&stats.router_id);
                self.history.add(&stats);
            }
            None => {}
        }
    }

    /// Seals a point of history every second until `shutdown`.
    pub fn spawn_ticker(
        &self,
        membership: Membership,
        loads: Loads,
        policy: watch::Receiver<Option<Vec<u8>>>,
        shutdown: CancellationToken,
    ) {
        let history = self.history.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut slo_ms = [0.0; 2];
            let mut policy = policy;
            policy.mark_changed();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                if policy.has_changed().unwrap_or(false) {
                    slo_ms = lane_slos(policy.borrow_and_update().as_deref());
                }
                let t = crate::events::now_unix_ms().div_euclid(1000);
                history.seal(t, pool_loads(&membership, &loads), slo_ms);
            }
        });
    }
}

/// The lanes' TTFT SLOs in the stored policy (the built-in default when none or unreadable).
fn lane_slos(stored: Option<&[u8]>) -> [f64; 2] {
    let policy = stored
        .and_then(|bytes| PolicyDocument::from_json(bytes).ok())
        .unwrap_or_default();
    let mut slo = [0.0; 2];
    for lane in LaneName::ALL {
        slo[lane.index()] = policy.lane(lane).ttft_slo_ms;
    }
    slo
}

/// The workers' live load summed per pool (gpu, wse).
fn pool_loads(membership: &Membership, loads: &Loads) -> [PoolLoad; 2] {
    let mut out = [PoolLoad::default(); 2];
    for worker in membership.current().iter() {
        let Some(load) = loads.get(&worker.id) else {
            continue;
        };
        let slot = &mut out[usize::from(worker.pool == Pool::Wse)];
        slot.active += load.active;
        slot.queued += load.queued;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_validated_with_the_field_named() {
        let decision = |d: v1::RoutingDecision| v1::RouterReport {
            report: Some(Report::Decision(d)),
        };
        let ok = v1::RoutingDecision {
            request_id: "r".into(),
            lane: "cost-sensitive".into(),
            ..Default::default()
        };
        assert!(validate(&decision(ok.clone())).is_ok());
        for (bad, field) in [
            (
                v1::RoutingDecision {
                    request_id: String::new(),
                    ..ok.clone()
                },
                "decision.request_id",
            ),
            (
                v1::RoutingDecision {
                    lane: "bulk".into(),
                    ..ok.clone()
                },
                "decision.lane",
            ),
            (
                v1::RoutingDecision {
                    tenant: "t".repeat(MAX_ID + 1),
                    ..ok.clone()
                },
                "decision.tenant",
            ),
            (
                v1::RoutingDecision {
                    candidates: vec![Default::default(); MAX_CANDIDATES + 1],
                    ..ok.clone()
                },
                "decision.candidates",
            ),
        ] {
            let err = validate(&decision(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(field), "{}", err.message());
        }
        let err = validate(&v1::RouterReport { report: None }).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let outcome = |moves: Vec<v1::MoveRecord>| v1::RouterReport {
            report: Some(Report::Outcome(v1::RequestOutcome {
                request_id: "r".into(),
                moves,
                ..Default::default()
            })),
        };
        let moved = v1::MoveRecord {
            reason: "drain".into(),
            ..Default::default()
        };
        assert!(validate(&outcome(vec![moved.clone()])).is_ok());
        for (bad, field) in [
            (
                vec![moved.clone(); MAX_MOVES + 1],
                "outcome.moves: 17 moves",
            ),
            (
                vec![v1::MoveRecord {
                    to_worker_id: "w".repeat(MAX_ID + 1),
                    ..moved
                }],
                "outcome.moves.to_worker_id",
            ),
        ] {
            let err = validate(&outcome(bad)).unwrap_err();
            assert!(err.message().starts_with(field), "{}", err.message());
        }
    }

    #[test]
    fn ledger_rows_are_validated() {
        let stats = |ledger: Vec<v1::LedgerStats>| v1::RouterReport {
            report: Some(Report::Stats(v1::RouterStats {
                ledger,
                ..Default::default()
            })),
        };
        let row = |dimension: &str, key: &str| v1::LedgerStats {
            dimension: dimension.into(),
            key: key.into(),
            ..Default::default()
        };
        assert!(
            validate(&stats(vec![
                row("lane", "cost-sensitive"),
                row("tenant", "acme")
            ]))
            .is_ok()
        );
        for (bad, message) in [
            (vec![row("lane", "bulk")], "stats.ledger.key: unknown lane"),
            (vec![row("model", "m")], "stats.ledger.dimension"),
            (
                vec![row("tenant", &"t".repeat(MAX_ID + 1))],
                "stats.ledger.key",
            ),
            (
                vec![row("pool", "gpu"); MAX_LEDGER_ROWS + 1],
                "stats.ledger: 257 rows",
            ),
        ] {
            let err = validate(&stats(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(message), "{}", err.message());
        }
    }

    #[test]
    fn slos_come_from_the_stored_policy() {
        let default = PolicyDocument::default();
        assert_eq!(
            lane_slos(None)[0],
            default.lane(LaneName::LatencyCritical).ttft_slo_ms
        );
        assert_eq!(lane_slos(Some(b"garbage")), lane_slos(None));
    }
}
