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
//!
//! Only the leader keeps reports, under its leadership term ([`Leadership::term`]): a replica
//! that does not lead — or whose lease is past due by its own clock, as after a freeze
//! (SIGSTOP) longer than the lease, before it hears that another replica leads — ignores
//! them. And a second's stats that arrive more than [`LATE`] later than the stream's quickest
//! delivery (buffered while this replica was frozen) are not folded into the open second,
//! where they would show as a spike at the wrong time. Both are counted in
//! `switchyard_control_plane_report_entries_ignored_total{reason}` and logged once a minute
//! per stream at most.

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

use crate::decisions::{self, Decisions};
use crate::history::{History, PoolLoad};
use crate::leader::Leadership;
use crate::loads::Loads;
use crate::metrics::{ReportDropLabels, ReportIgnoreLabels};

/// A report stream logs its dropped entries at most this often (the first one at once).
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);

/// A second's stats this much later than the stream's quickest delivery are not folded into
/// the open second (a router sends them once a second, as the second ends).
pub const LATE: Duration = Duration::from_secs(3);
/// Stats late for this long on end (by this replica's clock, not in one burst) mean the
/// router's clock stepped back: the stream's delivery is judged afresh from then on.
const LATE_FOR: Duration = Duration::from_secs(10);

/// The history and the decision feed, and the count of report entries dropped.
#[derive(Debug, Clone, Default)]
pub struct Insights {
    pub history: Arc<History>,
    /// Each router's last reported state.
    pub routers: Arc<crate::routers::Routers>,
    pub decisions: Arc<Decisions>,
    /// Report entries dropped as malformed, by entry
    /// (`switchyard_control_plane_report_entries_dropped_total`).
    pub dropped: Family<ReportDropLabels, Counter>,
    /// Reports not kept because this replica does not lead or they came late, by reason
    /// (`switchyard_control_plane_report_entries_ignored_total`).
    pub ignored: Family<ReportIgnoreLabels, Counter>,
    /// Whose reports these are: they are kept only while this replica leads. `None`: always
    /// (a lone control plane in tests).
    leadership: Option<Leadership>,
}

/// Why a report was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// This replica does not lead (or its lease is past due by its own clock).
    NotLeader,
    /// A second's stats that came [`LATE`].
    Late,
}

impl Ignored {
    pub const ALL: [Ignored; 2] = [Ignored::NotLeader, Ignored::Late];

    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::NotLeader => "not_leader",
            Ignored::Late => "late",
        }
    }
}

/// A part of a report that was not kept, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// `decision`, `outcome`, `stats`, `stats.lanes`, `stats.ledger`, `stats.apis` or
    /// `empty`.
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
/// whole or not at all; a second's stats without their bad lane, ledger and API rows (nothing of
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
                    dropped.extend(screen_rows(
                        "stats.ledger",
                        &mut s.ledger,
                        limits::LEDGER_ROWS,
                        check_ledger_row,
                    ));
                    dropped.extend(screen_rows(
                        "stats.apis",
                        &mut s.apis,
                        limits::APIS,
                        |row| too_long("stats.apis.api", &row.api, limits::ID_BYTES),
                    ));
                    if let Some(state) = &s.state
                        && !crate::routers::MIRROR_STATES.contains(&state.response_mirror.as_str())
                    {
                        dropped.push(drop(
                            "stats.state",
                            1,
                            format!(
                                "stats.state.response_mirror: {:?} is none of {:?}",
                                state.response_mirror.chars().take(64).collect::<String>(),
                                crate::routers::MIRROR_STATES
                            ),
                        ));
                        s.state = None;
                    }
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

/// Keeps the first `max` of a second's `rows` and, of those, the ones `check` passes; what
/// goes is listed under `entry` (the rows over the bound together).
fn screen_rows<T>(
    entry: &'static str,
    rows: &mut Vec<T>,
    max: usize,
    check: impl Fn(&T) -> Result<(), String>,
) -> Vec<Dropped> {
    let mut dropped = Vec::new();
    if rows.len() > max {
        dropped.push(Dropped {
            entry,
            count: (rows.len() - max) as u64,
            reason: format!("{entry}: {} rows, at most {max}", rows.len()),
        });
        rows.truncate(max);
    }
    rows.retain(|row| match check(row) {
        Ok(()) => true,
        Err(reason) => {
            dropped.push(Dropped {
                entry,
                count: 1,
                reason,
            });
            false
        }
    });
    dropped
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
    /// How the stream's stats arrive.
    delivery: Delivery,
    /// When this stream last logged an ignored report, and those ignored since (not logged).
    ignored_logged_at: Option<Instant>,
    ignored_unlogged: u64,
}

/// How late a stream's stats arrive: against its quickest delivery (this replica's clock
/// minus the router's at sending), so the two clocks need not agree.
#[derive(Debug, Default)]
struct Delivery {
    /// The least (receipt − sending) seen, ms.
    quickest: Option<i64>,
    /// Since when (this replica's clock) every stats report has come late.
    late_since: Option<Instant>,
}

impl Delivery {
    /// How late stats sent at `sent_ms` (the router's clock) and received at `now_ms` (this
    /// replica's) are, if later than [`LATE`]. An unknown sending time (0) is never late.
    fn late(&mut self, sent_ms: i64, now_ms: i64, now: Instant) -> Option<Duration> {
        if sent_ms <= 0 {
            return None;
        }
        let transit = now_ms.saturating_sub(sent_ms);
        let quickest = *self.quickest.get_or_insert(transit);
        if transit < quickest {
            self.quickest = Some(transit);
        }
        let behind = Duration::from_millis(transit.saturating_sub(quickest).max(0).unsigned_abs());
        if behind <= LATE {
            self.late_since = None;
            return None;
        }
        // Late report after late report for a while, not a burst of buffered ones: the
        // router's clock went back. Judge from its new reckoning.
        let since = *self.late_since.get_or_insert(now);
        if now.duration_since(since) >= LATE_FOR {
            self.quickest = Some(transit);
            self.late_since = None;
            return None;
        }
        Some(behind)
    }
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
        let kept = kept.and_then(|report| self.judge(report));
        let taken = kept.is_some();
        if let Some((term, report)) = kept {
            self.insights.ingest(term, &mut self.router_id, report);
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

    /// The leadership term to keep a (screened) report under, or `None` when it is not kept:
    /// this replica does not lead, or it is a second's stats that came late.
    fn judge(&mut self, report: v1::RouterReport) -> Option<(i64, v1::RouterReport)> {
        let now = Instant::now();
        let (reason, late) = match self.insights.term() {
            None => (Ignored::NotLeader, None),
            Some(term) => {
                let late = match &report.report {
                    Some(Report::Stats(stats)) => {
                        let now_ms = crate::events::now_unix_ms();
                        self.delivery.late(stats.at_unix_ms, now_ms, now)
                    }
                    _ => None,
                };
                if late.is_none() {
                    return Some((term, report));
                }
                (Ignored::Late, late)
            }
        };
        self.insights
            .ignored
            .get_or_create(&ReportIgnoreLabels {
                reason: reason.as_str(),
            })
            .inc();
        self.ignored_unlogged += 1;
        if self
            .ignored_logged_at
            .is_none_or(|at| now.duration_since(at) >= DROP_LOG_EVERY)
        {
            let router = match &report.report {
                Some(Report::Decision(d)) => d.router_id.as_str(),
                Some(Report::Stats(s)) => s.router_id.as_str(),
                _ => self.router(),
            };
            let ignored = self.ignored_unlogged;
            match late {
                None => warn!(
                    %router,
                    ignored,
                    "ignoring a router's reports: this replica does not lead (or its lease ran \
                     out while it was stalled); routers report to the leader"
                ),
                Some(late) => warn!(
                    %router,
                    late_ms = late.as_millis(),
                    ignored,
                    "not folding a router's stats into the history: they came late (buffered \
                     while this replica was stalled?) and would show at the wrong second"
                ),
            }
            self.ignored_logged_at = Some(now);
            self.ignored_unlogged = 0;
        }
        None
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
        if self.ignored_unlogged > 0 {
            warn!(
                router = %self.router(),
                ignored = self.ignored_unlogged,
                "ignored router reports (not the leader, or late) since the last warning; the stream ended"
            );
        }
    }
}

impl Insights {
    /// The insights of a replica that keeps reports only while it leads.
    pub fn led_by(leadership: Leadership) -> Self {
        Self {
            leadership: Some(leadership),
            ..Self::default()
        }
    }

    /// The leadership term reports are kept under now; `None` while this replica does not
    /// lead.
    pub fn term(&self) -> Option<i64> {
        match &self.leadership {
            Some(leadership) => leadership.term(),
            None => Some(0),
        }
    }

    /// A page of the decision feed: the current term's while this replica leads, else the
    /// one it kept when it last led; `since` counts in the feed of `epoch` (when given).
    pub fn feed(
        &self,
        epoch: Option<i64>,
        since: u64,
        request_id: Option<&str>,
        limit: usize,
    ) -> decisions::Page {
        let since = decisions::Cursor { epoch, since };
        self.decisions.page(self.term(), since, request_id, limit)
    }

    /// The intake of one report stream.
    pub fn intake(&self) -> Intake<'_> {
        Intake {
            insights: self,
            router_id: String::new(),
            accepted: 0,
            logged_at: None,
            unlogged: 0,
            delivery: Delivery::default(),
            ignored_logged_at: None,
            ignored_unlogged: 0,
        }
    }

    /// Keeps a screened report from router `router_id` (the router of its stream), reported
    /// during leadership term `term`.
    pub fn ingest(&self, term: i64, router_id: &mut String, report: v1::RouterReport) {
        match report.report {
            Some(Report::Decision(decision)) => {
                router_id.clone_from(&decision.router_id);
                self.decisions.add(term, decision);
            }
            Some(Report::Outcome(outcome)) => self.decisions.complete(term, router_id, outcome),
            Some(Report::Stats(stats)) => {
                router_id.clone_from(&stats.router_id);
                self.history.add(&stats);
                self.routers.add(&stats);
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
            // No line until a policy is read: 0 draws none.
            let mut slo_ms = [0.0; 2];
            let mut policy = policy;
            policy.mark_changed();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                if policy.has_changed().unwrap_or(false) {
                    slo_ms = lane_slos(policy.borrow_and_update().as_deref(), slo_ms);
                }
                let t = crate::events::now_unix_ms().div_euclid(1000);
                history.seal(t, pool_loads(&membership, &loads), slo_ms);
            }
        });
    }
}

/// The lanes' TTFT SLOs in the stored policy, the built-in default's when none is stored. An
/// invalid document leaves `current` as it was: routers that run keep routing by their last
/// valid policy and new ones route nothing, so the default's SLOs would be nobody's.
fn lane_slos(stored: Option<&[u8]>, current: [f64; 2]) -> [f64; 2] {
    let policy = match stored.map(PolicyDocument::from_json) {
        None => PolicyDocument::default(),
        Some(Ok(policy)) => policy,
        Some(Err(_)) => return current,
    };
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
    fn front_door_rows_are_bounded_and_a_bad_one_dropped_alone() {
        let api = |name: &str| v1::ApiAnswers {
            api: name.into(),
            ok: 1,
            ..Default::default()
        };
        let stats = |apis: Vec<v1::ApiAnswers>| v1::RouterReport {
            report: Some(Report::Stats(v1::RouterStats {
                router_id: "r".into(),
                apis,
                ..Default::default()
            })),
        };
        let long = "a".repeat(limits::ID_BYTES + 1);
        let (kept, dropped) = screen(stats(vec![api("completions"), api(&long)]));
        assert_eq!(kept, Some(stats(vec![api("completions")])));
        assert_eq!((dropped[0].entry, dropped[0].count), ("stats.apis", 1));
        let (kept, dropped) = screen(stats(vec![api("chat_completions"); limits::APIS + 2]));
        let Some(Report::Stats(kept)) = kept.and_then(|r| r.report) else {
            panic!("the stats are kept");
        };
        assert_eq!(kept.apis.len(), limits::APIS);
        assert_eq!((dropped[0].entry, dropped[0].count), ("stats.apis", 2));
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
        let page = insights.feed(None, 0, None, 10);
        let ids: Vec<&str> = page
            .entries
            .iter()
            .filter_map(|e| e["request_id"].as_str())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let a = insights.feed(None, 0, Some("a"), 10);
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

    fn stats(router: &str, at_unix_ms: i64, decisions: u32) -> v1::RouterReport {
        v1::RouterReport {
            report: Some(Report::Stats(v1::RouterStats {
                router_id: router.into(),
                at_unix_ms,
                decisions,
                ..Default::default()
            })),
        }
    }

    fn decision(request_id: &str) -> v1::RouterReport {
        v1::RouterReport {
            report: Some(Report::Decision(v1::RoutingDecision {
                request_id: request_id.into(),
                router_id: "router-0".into(),
                lane: "cost-sensitive".into(),
                ..Default::default()
            })),
        }
    }

    fn ignored(insights: &Insights, reason: Ignored) -> u64 {
        insights
            .ignored
            .get_or_create(&ReportIgnoreLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    #[test]
    fn only_a_leader_whose_lease_is_not_past_due_keeps_reports() {
        let me = crate::leader::ReplicaInfo {
            id: "cp-0".into(),
            grpc: "127.0.0.1:1".into(),
            http: None,
        };
        let (leadership, script) = crate::leader::Script::start(me);
        let insights = Insights::led_by(leadership);
        let now = crate::events::now_unix_ms;
        let mut intake = insights.intake();
        // A follower keeps nothing.
        assert!(!intake.take(stats("router-0", now(), 5)));
        assert!(!intake.take(decision("before")));
        assert_eq!(ignored(&insights, Ignored::NotLeader), 2);
        // Leading: kept.
        script.lead(Duration::from_secs(60));
        assert!(intake.take(stats("router-0", now(), 3)));
        assert!(intake.take(decision("led-1")));
        assert_eq!(
            insights
                .history
                .seal(1, Default::default(), [0.0; 2])
                .decisions,
            3
        );
        let first = insights.feed(None, 0, None, 10);
        assert_eq!(first.entries.len(), 1);
        // Frozen past its lease: by its own clock it no longer leads, before it hears so.
        script.stall();
        assert!(!intake.take(stats("router-0", now(), 7)));
        assert!(!intake.take(decision("stalled")));
        assert_eq!(
            insights
                .history
                .seal(2, Default::default(), [0.0; 2])
                .decisions,
            0
        );
        script.follow();
        assert!(!intake.take(decision("followed")));
        assert_eq!(ignored(&insights, Ignored::NotLeader), 5);
        // The feed it kept while leading stays readable as it was.
        assert_eq!(insights.feed(None, 0, None, 10).entries.len(), 1);
        // Leading again: a new term, a new feed; the old cursor (of another epoch) is answered
        // from the start.
        script.lead(Duration::from_secs(60));
        assert!(intake.take(decision("led-2")));
        let second = insights.feed(Some(first.epoch), first.seq, None, 10);
        assert!(
            second.epoch > first.epoch,
            "{} {}",
            second.epoch,
            first.epoch
        );
        assert!(second.reset);
        let ids: Vec<_> = second
            .entries
            .iter()
            .map(|e| e["request_id"].clone())
            .collect();
        assert_eq!(ids, [serde_json::json!("led-2")]);
    }

    #[test]
    fn stats_delivered_late_are_not_folded_into_the_open_second() {
        let insights = Insights::default();
        let mut intake = insights.intake();
        let now = crate::events::now_unix_ms();
        // The router's clock 40 s behind this replica's: what counts is the delivery.
        let skew = 40_000;
        assert!(intake.take(stats("router-0", now - skew, 1)));
        assert!(intake.take(stats("router-0", now - skew - 1_500, 2)));
        // Buffered while this replica was frozen, then read at once: 10 s late.
        assert!(!intake.take(stats("router-0", now - skew - 10_000, 40)));
        assert!(!intake.take(stats("router-0", now - skew - 9_000, 40)));
        assert_eq!(ignored(&insights, Ignored::Late), 2);
        // Decisions carry their own time: kept.
        assert!(intake.take(decision("late-decision")));
        // An unknown sending time is not judged.
        assert!(intake.take(stats("router-0", 0, 4)));
        assert_eq!(
            insights
                .history
                .seal(1, Default::default(), [0.0; 2])
                .decisions,
            7
        );
    }

    #[test]
    fn a_stream_late_on_end_is_judged_afresh_not_dropped_forever() {
        let mut delivery = Delivery::default();
        let t0 = Instant::now();
        assert_eq!(delivery.late(1_000, 1_020, t0), None);
        // A burst of late ones.
        assert!(delivery.late(2_000, 9_020, t0).is_some());
        assert!(
            delivery
                .late(3_000, 9_030, t0 + Duration::from_millis(10))
                .is_some()
        );
        // On time again: the burst is over.
        assert_eq!(
            delivery.late(9_000, 9_040, t0 + Duration::from_millis(20)),
            None
        );
        // The router's clock steps back 20 s: late report after late report, once a second,
        // for LATE_FOR; then its reports count again.
        let mut kept = Vec::new();
        for i in 0..15 {
            let at = t0 + Duration::from_secs(1 + i);
            let now_ms = 100_000 + 1_000 * i64::try_from(i).unwrap();
            kept.push(delivery.late(now_ms - 20_000, now_ms, at).is_none());
        }
        assert_eq!(kept.iter().filter(|k| !**k).count(), 10, "{kept:?}");
        assert!(kept[10..].iter().all(|k| *k), "{kept:?}");
    }

    #[test]
    fn slos_come_from_the_stored_policy_and_an_invalid_one_changes_none() {
        let default = PolicyDocument::default();
        let lc = LaneName::LatencyCritical.index();
        assert_eq!(
            lane_slos(None, [0.0; 2])[lc],
            default.lane(LaneName::LatencyCritical).ttft_slo_ms
        );
        let mut stored = default.clone();
        stored.latency_critical.ttft_slo_ms = 123.0;
        let valid = lane_slos(Some(&serde_json::to_vec(&stored).unwrap()), [0.0; 2]);
        assert_eq!(valid[lc], 123.0);
        assert_eq!(lane_slos(Some(b"garbage"), valid), valid);
        assert_eq!(lane_slos(Some(b"garbage"), [0.0; 2]), [0.0; 2]);
    }
}
