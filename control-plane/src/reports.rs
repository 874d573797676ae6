//! What routers report (`Admin.Report`): decisions and outcomes feed [`Decisions`], per-second
//! stats feed [`History`], which a ticker seals once a second with the workers' live load and
//! the lanes' SLOs from the stored policy.
//!
//! Routers report to the leader (they follow the leader key), so the leader's dashboard has
//! the history; a follower's starts filling when it takes over.
//!
//! A malformed entry (an id over [`limits::ID_BYTES`], an unknown lane, …) is dropped alone —
//! counted in `switchyard_control_plane_report_entries_dropped_total{entry}` and logged at
//! most once a minute per stream — and the stream goes on: one bad entry must not cost the
//! router's other decisions and stats.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use switchyard_cluster::{Membership, Pool};
use switchyard_policy::document::{LaneName, PolicyDocument};
use switchyard_proto::v1::{self, router_report::Report};
use switchyard_router::report::limits;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::decisions::Decisions;
use crate::history::{History, PoolLoad};
use crate::loads::Loads;
use crate::metrics::ReportDropLabels;

/// A report stream logs its dropped entries at most this often (the first one at once).
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);

/// The history and the decision feed, and the count of report entries dropped.
#[derive(Debug, Clone, Default)]
pub struct Insights {
    pub history: Arc<History>,
    pub decisions: Arc<Decisions>,
    /// Report entries dropped as malformed, by entry
    /// (`switchyard_control_plane_report_entries_dropped_total`).
    pub dropped: Family<ReportDropLabels, Counter>,
}

/// A part of a report that was not kept, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// `decision`, `outcome`, `stats`, `stats.lanes`, `stats.ledger` or `empty`.
    pub entry: &'static str,
    /// How many of them (ledger rows beyond the bound go together).
    pub count: u64,
    /// The field at fault and the rule it breaks.
    pub reason: String,
}

fn too_long(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{field}: {} bytes, at most {max}", value.len()));
    }
    Ok(())
}

fn known_lane(field: &str, lane: &str) -> Result<(), String> {
    if LaneName::ALL.iter().any(|l| l.as_str() == lane) {
        return Ok(());
    }
    Err(format!(
        "{field}: unknown lane {lane:?}, expected latency-critical or cost-sensitive"
    ))
}

fn check_decision(d: &v1::RoutingDecision) -> Result<(), String> {
    if d.request_id.is_empty() {
        return Err("decision.request_id: must not be empty".into());
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
        too_long(field, value, limits::ID_BYTES)?;
    }
    too_long("decision.reason_text", &d.reason_text, limits::TEXT_BYTES)?;
    if d.candidates.len() > limits::CANDIDATES {
        return Err(format!(
            "decision.candidates: {} candidates, at most {}",
            d.candidates.len(),
            limits::CANDIDATES
        ));
    }
    for c in &d.candidates {
        too_long(
            "decision.candidates.worker_id",
            &c.worker_id,
            limits::ID_BYTES,
        )?;
    }
    Ok(())
}

fn check_outcome(o: &v1::RequestOutcome) -> Result<(), String> {
    if o.request_id.is_empty() {
        return Err("outcome.request_id: must not be empty".into());
    }
    too_long("outcome.request_id", &o.request_id, limits::ID_BYTES)?;
    too_long("outcome.worker_id", &o.worker_id, limits::ID_BYTES)?;
    too_long(
        "outcome.best_alternative_worker_id",
        &o.best_alternative_worker_id,
        limits::ID_BYTES,
    )?;
    too_long("outcome.error", &o.error, limits::TEXT_BYTES)?;
    if o.moves.len() > limits::MOVES {
        return Err(format!(
            "outcome.moves: {} moves, at most {}",
            o.moves.len(),
            limits::MOVES
        ));
    }
    for m in &o.moves {
        for (field, value) in [
            ("outcome.moves.from_worker_id", &m.from_worker_id),
            ("outcome.moves.from_pool", &m.from_pool),
            ("outcome.moves.to_worker_id", &m.to_worker_id),
            ("outcome.moves.to_pool", &m.to_pool),
            ("outcome.moves.reason", &m.reason),
        ] {
            too_long(field, value, limits::ID_BYTES)?;
        }
    }
    Ok(())
}

fn check_ledger_row(row: &v1::LedgerStats) -> Result<(), String> {
    too_long("stats.ledger.key", &row.key, limits::ID_BYTES)?;
    match row.dimension.as_str() {
        "lane" => known_lane("stats.ledger.key", &row.key),
        "pool" | "tenant" => Ok(()),
        other => Err(format!(
            "stats.ledger.dimension: unknown {other:?}, expected lane, pool or tenant"
        )),
    }
}

/// Keeps what is valid of a report before anything of it is stored: a decision or an outcome
/// whole or not at all; a second's stats without their bad lane and ledger rows (nothing of
/// them when the router id is bad). Every part left out is in the list, the field at fault
/// named.
pub fn screen(report: v1::RouterReport) -> (Option<v1::RouterReport>, Vec<Dropped>) {
    let drop = |entry, count, reason| Dropped {
        entry,
        count,
        reason,
    };
    let mut dropped = Vec::new();
    let kept = match report.report {
        None => {
            dropped.push(drop(
                "empty",
                1,
                "report: empty (expected a decision, an outcome or stats)".into(),
            ));
            None
        }
        Some(Report::Decision(d)) => match check_decision(&d) {
            Ok(()) => Some(Report::Decision(d)),
            Err(reason) => {
                dropped.push(drop("decision", 1, reason));
                None
            }
        },
        Some(Report::Outcome(o)) => match check_outcome(&o) {
            Ok(()) => Some(Report::Outcome(o)),
            Err(reason) => {
                dropped.push(drop("outcome", 1, reason));
                None
            }
        },
        Some(Report::Stats(mut s)) => {
            match too_long("stats.router_id", &s.router_id, limits::ID_BYTES) {
                Err(reason) => {
                    dropped.push(drop("stats", 1, reason));
                    None
                }
                Ok(()) => {
                    s.lanes
                        .retain(|lane| match known_lane("stats.lanes.lane", &lane.lane) {
                            Ok(()) => true,
                            Err(reason) => {
                                dropped.push(drop("stats.lanes", 1, reason));
                                false
                            }
                        });
                    if s.ledger.len() > limits::LEDGER_ROWS {
                        dropped.push(drop(
                            "stats.ledger",
                            (s.ledger.len() - limits::LEDGER_ROWS) as u64,
                            format!(
                                "stats.ledger: {} rows, at most {}",
                                s.ledger.len(),
                                limits::LEDGER_ROWS
                            ),
                        ));
                        s.ledger.truncate(limits::LEDGER_ROWS);
                    }
                    s.ledger.retain(|row| match check_ledger_row(row) {
                        Ok(()) => true,
                        Err(reason) => {
                            dropped.push(drop("stats.ledger", 1, reason));
                            false
                        }
                    });
                    Some(Report::Stats(s))
                }
            }
        }
    };
    (
        kept.map(|report| v1::RouterReport {
            report: Some(report),
        }),
        dropped,
    )
}

/// One router's report stream: keeps what is valid of each report and drops the rest (counted
/// in the metric, logged at most every [`DROP_LOG_EVERY`]); a bad entry never ends the
/// stream, so it costs no other request's decision or second's stats.
#[derive(Debug)]
pub struct Intake<'a> {
    insights: &'a Insights,
    /// The router of the stream, once a decision or stats named it.
    router_id: String,
    accepted: u64,
    /// When this stream last logged a drop, and the entries dropped since (not logged).
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl Intake<'_> {
    /// Keeps what is valid of `report`; `false` when nothing of it was kept.
    pub fn take(&mut self, report: v1::RouterReport) -> bool {
        let (kept, dropped) = screen(report);
        for d in &dropped {
            self.insights
                .dropped
                .get_or_create(&ReportDropLabels { entry: d.entry })
                .inc_by(d.count);
        }
        let taken = kept.is_some();
        if let Some(report) = kept {
            self.insights.ingest(&mut self.router_id, report);
            self.accepted += 1;
        }
        if let Some(first) = dropped.first() {
            self.unlogged += dropped.iter().map(|d| d.count).sum::<u64>();
            let now = Instant::now();
            if self
                .logged_at
                .is_none_or(|at| now.duration_since(at) >= DROP_LOG_EVERY)
            {
                warn!(
                    router = %self.router(),
                    entry = first.entry,
                    reason = %first.reason,
                    dropped = self.unlogged,
                    "dropped a router report entry (malformed); the rest of the stream is kept"
                );
                self.logged_at = Some(now);
                self.unlogged = 0;
            }
        }
        taken
    }

    fn router(&self) -> &str {
        if self.router_id.is_empty() {
            "(not named yet)"
        } else {
            &self.router_id
        }
    }

    /// Reports kept (whole or in part) so far.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }
}

impl Drop for Intake<'_> {
    /// The drops not logged yet when the stream ends.
    fn drop(&mut self) {
        if self.unlogged > 0 {
            warn!(
                router = %self.router(),
                dropped = self.unlogged,
                "dropped router report entries (malformed) since the last warning; the stream ended"
            );
        }
    }
}

impl Insights {
    /// The intake of one report stream.
    pub fn intake(&self) -> Intake<'_> {
        Intake {
            insights: self,
            router_id: String::new(),
            accepted: 0,
            logged_at: None,
            unlogged: 0,
        }
    }

    /// Keeps a screened report from router `router_id` (the router of its stream).
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

    /// The one drop of a report screened as wholly bad, its field named.
    fn dropped_whole(report: v1::RouterReport) -> Dropped {
        let (kept, dropped) = screen(report);
        assert!(kept.is_none(), "{kept:?}");
        let [one] = dropped.as_slice() else {
            panic!("one drop expected: {dropped:?}");
        };
        one.clone()
    }

    #[test]
    fn bad_decisions_and_outcomes_are_dropped_with_the_field_named() {
        let decision = |d: v1::RoutingDecision| v1::RouterReport {
            report: Some(Report::Decision(d)),
        };
        let ok = v1::RoutingDecision {
            request_id: "r".into(),
            lane: "cost-sensitive".into(),
            ..Default::default()
        };
        assert_eq!(
            screen(decision(ok.clone())),
            (Some(decision(ok.clone())), vec![])
        );
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
                    tenant: "t".repeat(limits::ID_BYTES + 1),
                    ..ok.clone()
                },
                "decision.tenant",
            ),
            (
                v1::RoutingDecision {
                    candidates: vec![Default::default(); limits::CANDIDATES + 1],
                    ..ok.clone()
                },
                "decision.candidates",
            ),
        ] {
            let dropped = dropped_whole(decision(bad));
            assert_eq!((dropped.entry, dropped.count), ("decision", 1));
            assert!(dropped.reason.starts_with(field), "{}", dropped.reason);
        }
        assert_eq!(
            dropped_whole(v1::RouterReport { report: None }).entry,
            "empty"
        );
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
        assert!(screen(outcome(vec![moved.clone()])).1.is_empty());
        for (bad, field) in [
            (
                vec![moved.clone(); limits::MOVES + 1],
                "outcome.moves: 17 moves",
            ),
            (
                vec![v1::MoveRecord {
                    to_worker_id: "w".repeat(limits::ID_BYTES + 1),
                    ..moved
                }],
                "outcome.moves.to_worker_id",
            ),
        ] {
            let dropped = dropped_whole(outcome(bad));
            assert_eq!(dropped.entry, "outcome");
            assert!(dropped.reason.starts_with(field), "{}", dropped.reason);
        }
    }

    #[test]
    fn bad_stats_rows_are_dropped_and_the_rest_of_the_second_kept() {
        let stats = |lanes: Vec<&str>, ledger: Vec<v1::LedgerStats>| v1::RouterReport {
            report: Some(Report::Stats(v1::RouterStats {
                router_id: "r".into(),
                lanes: lanes
                    .into_iter()
                    .map(|lane| v1::LaneStats {
                        lane: lane.into(),
                        ..Default::default()
                    })
                    .collect(),
                ledger,
                ..Default::default()
            })),
        };
        let row = |dimension: &str, key: &str| v1::LedgerStats {
            dimension: dimension.into(),
            key: key.into(),
            ..Default::default()
        };
        let good = vec![row("lane", "cost-sensitive"), row("tenant", "acme")];
        let report = stats(vec!["cost-sensitive"], good.clone());
        assert_eq!(screen(report.clone()), (Some(report), vec![]));
        for (bad, message) in [
            (vec![row("lane", "bulk")], "stats.ledger.key: unknown lane"),
            (vec![row("model", "m")], "stats.ledger.dimension"),
            (
                vec![row("tenant", &"t".repeat(limits::ID_BYTES + 1))],
                "stats.ledger.key",
            ),
        ] {
            let mut rows = good.clone();
            rows.insert(1, bad[0].clone());
            let (kept, dropped) = screen(stats(vec!["cost-sensitive"], rows));
            // The bad row goes, the good ones stay.
            assert_eq!(kept, Some(stats(vec!["cost-sensitive"], good.clone())));
            let [one] = dropped.as_slice() else {
                panic!("one drop expected: {dropped:?}");
            };
            assert_eq!((one.entry, one.count), ("stats.ledger", 1));
            assert!(one.reason.starts_with(message), "{}", one.reason);
        }
        // Rows over the bound: the first ones are kept.
        let (kept, dropped) = screen(stats(
            vec![],
            vec![row("pool", "gpu"); limits::LEDGER_ROWS + 3],
        ));
        let Some(Report::Stats(kept)) = kept.and_then(|r| r.report) else {
            panic!("the stats are kept");
        };
        assert_eq!(kept.ledger.len(), limits::LEDGER_ROWS);
        assert_eq!(dropped[0].count, 3);
        assert!(dropped[0].reason.starts_with("stats.ledger: 259 rows"));
        // An unknown lane's row goes alone.
        let (kept, dropped) = screen(stats(vec!["bulk", "latency-critical"], vec![]));
        assert_eq!(kept, Some(stats(vec!["latency-critical"], vec![])));
        assert_eq!(dropped[0].entry, "stats.lanes");
        // A router id over the bound: nothing of the second can be attributed.
        let mut bad = stats(vec!["latency-critical"], good);
        if let Some(Report::Stats(s)) = &mut bad.report {
            s.router_id = "r".repeat(limits::ID_BYTES + 1);
        }
        assert_eq!(dropped_whole(bad).entry, "stats");
    }

    #[test]
    fn a_stream_keeps_everything_but_its_bad_entries() {
        let insights = Insights::default();
        let mut intake = insights.intake();
        let decision = |request_id: String| v1::RouterReport {
            report: Some(Report::Decision(v1::RoutingDecision {
                request_id,
                router_id: "router-0".into(),
                lane: "cost-sensitive".into(),
                ..Default::default()
            })),
        };
        let outcome = |request_id: &str| v1::RouterReport {
            report: Some(Report::Outcome(v1::RequestOutcome {
                request_id: request_id.into(),
                status: "completed".into(),
                ..Default::default()
            })),
        };
        let row = |key: String| v1::LedgerStats {
            dimension: "tenant".into(),
            key,
            judged: 1,
            ..Default::default()
        };
        let taken: Vec<bool> = [
            decision("a".into()),
            decision("x".repeat(20_000)),
            outcome("a"),
            v1::RouterReport { report: None },
            v1::RouterReport {
                report: Some(Report::Stats(v1::RouterStats {
                    router_id: "router-0".into(),
                    ledger: vec![row("acme".into()), row("k".repeat(20_000))],
                    decisions: 3,
                    ..Default::default()
                })),
            },
            decision("b".into()),
        ]
        .into_iter()
        .map(|report| intake.take(report))
        .collect();
        assert_eq!(taken, [true, false, true, false, true, true]);
        assert_eq!(intake.accepted(), 4);
        drop(intake);
        // Both good decisions are in the feed, the first with its outcome.
        let page = insights.decisions.page(0, None, 10);
        let ids: Vec<&str> = page
            .entries
            .iter()
            .filter_map(|e| e["request_id"].as_str())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let a = insights.decisions.page(0, Some("a"), 10);
        assert_eq!(a.entries[0]["outcome"]["status"], "completed");
        // The second's stats are in the history, its good ledger row included.
        let point = insights.history.seal(1, Default::default(), [0.0; 2]);
        assert_eq!(point.decisions, 3);
        assert!(
            point
                .ledger
                .tenants
                .iter()
                .any(|(tenant, _)| tenant == "acme"),
            "{:?}",
            point.ledger.tenants
        );
        let count = |entry| {
            insights
                .dropped
                .get_or_create(&ReportDropLabels { entry })
                .get()
        };
        assert_eq!(
            (count("decision"), count("empty"), count("stats.ledger")),
            (1, 1, 1)
        );
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
