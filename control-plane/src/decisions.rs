//! The live decision feed: the most recent routing decisions routers reported (sampled under
//! load), each completed by its outcome when the request ends. Bounded to [`RECENT`] entries.
//!
//! Every entry has a stable `id` and a `seq` that grows whenever it changes (created, outcome
//! attached): a client polling `since=<last seq>` gets new decisions and late outcomes alike.
//!
//! A feed belongs to one leadership term of the replica keeping it (its `epoch`, the unix
//! millisecond the term began): routers report to the leader only, so a replica that leads
//! again starts a new feed, ids and `seq` from 1, instead of adding to one whose requests'
//! outcomes went to another leader. A `since` beyond the feed's `seq` (a cursor into another
//! feed) is answered from the start, marked `reset`.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::{Value, json};
use switchyard_proto::v1;

/// Decisions kept.
pub const RECENT: usize = 500;

#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    seq: u64,
    decision: v1::RoutingDecision,
    outcome: Option<v1::RequestOutcome>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The leadership term the entries were reported in (unix ms it began; 0: none yet).
    epoch: i64,
    entries: VecDeque<Entry>,
    next_id: u64,
    seq: u64,
    /// Outcomes whose decision was not (or no longer) in the feed.
    unmatched_outcomes: u64,
}

impl Inner {
    /// The feed of term `epoch`: this one, or a new, empty one.
    fn of_term(&mut self, epoch: i64) -> &mut Self {
        if self.epoch != epoch {
            *self = Inner {
                epoch,
                ..Inner::default()
            };
        }
        self
    }
}

#[derive(Debug, Default)]
pub struct Decisions {
    inner: Mutex<Inner>,
}

/// Where a client is in a feed: its `seq`, in the feed of `epoch` (when it says).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cursor {
    pub epoch: Option<i64>,
    pub since: u64,
}

impl From<u64> for Cursor {
    fn from(since: u64) -> Self {
        Self { epoch: None, since }
    }
}

/// A page of the feed.
#[derive(Debug)]
pub struct Page {
    pub entries: Vec<Value>,
    /// The highest `seq` in the feed (pass it back as `since`).
    pub seq: u64,
    /// The leadership term the feed belongs to (unix ms it began; 0 for a replica that never
    /// led): a client following the feed starts over when it changes.
    pub epoch: i64,
    /// The cursor was into another feed (another epoch, or `since` beyond this feed's `seq`):
    /// the page starts from the beginning instead.
    pub reset: bool,
}

impl Decisions {
    /// Adds a decision reported during leadership term `epoch` (a new term starts a new feed).
    pub fn add(&self, epoch: i64, decision: v1::RoutingDecision) {
        let mut guard = self.inner.lock().expect("decisions lock");
        let inner = guard.of_term(epoch);
        inner.next_id += 1;
        inner.seq += 1;
        let entry = Entry {
            id: inner.next_id,
            seq: inner.seq,
            decision,
            outcome: None,
        };
        if inner.entries.len() == RECENT {
            inner.entries.pop_front();
        }
        inner.entries.push_back(entry);
    }

    /// Attaches `outcome` (reported during term `epoch`) to the latest decision of the same
    /// router and request without one.
    pub fn complete(&self, epoch: i64, router_id: &str, outcome: v1::RequestOutcome) {
        let mut guard = self.inner.lock().expect("decisions lock");
        let inner = guard.of_term(epoch);
        inner.seq += 1;
        let seq = inner.seq;
        let entry = inner.entries.iter_mut().rev().find(|e| {
            e.outcome.is_none()
                && e.decision.request_id == outcome.request_id
                && e.decision.router_id == router_id
        });
        match entry {
            Some(entry) => {
                entry.outcome = Some(outcome);
                entry.seq = seq;
            }
            None => inner.unmatched_outcomes += 1,
        }
    }

    /// Entries changed after the cursor (all of them when it is into another feed: `reset`),
    /// or those of `request_id` (any age still kept), oldest first, at most `limit` (the
    /// newest). `term`: the leadership term this replica holds now, whose feed is answered
    /// (empty until its first report); `None` while it does not lead: the feed it has.
    pub fn page(
        &self,
        term: Option<i64>,
        cursor: impl Into<Cursor>,
        request_id: Option<&str>,
        limit: usize,
    ) -> Page {
        let cursor = cursor.into();
        let mut guard = self.inner.lock().expect("decisions lock");
        let inner = match term {
            Some(epoch) => guard.of_term(epoch),
            None => &mut *guard,
        };
        let reset =
            cursor.since > inner.seq || cursor.epoch.is_some_and(|epoch| epoch != inner.epoch);
        let since = if reset { 0 } else { cursor.since };
        let mut entries: Vec<&Entry> = inner
            .entries
            .iter()
            .filter(|e| e.seq > since)
            .filter(|e| request_id.is_none_or(|id| e.decision.request_id == id))
            .collect();
        entries.sort_by_key(|e| e.seq);
        let skip = entries.len().saturating_sub(limit);
        Page {
            entries: entries[skip..].iter().map(|e| entry_json(e)).collect(),
            seq: inner.seq,
            epoch: inner.epoch,
            reset,
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("decisions lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn entry_json(entry: &Entry) -> Value {
    let d = &entry.decision;
    let candidates: Vec<Value> = d
        .candidates
        .iter()
        .map(|c| {
            json!({
                "worker_id": c.worker_id, "pool": c.pool,
                "predicted_ttft_ms": c.predicted_ttft_ms, "cached_tokens": c.cached_tokens,
                "cost_per_mtok": c.cost_per_mtok, "score": c.score,
                "meets_slo": c.meets_slo, "affinity": c.affinity,
                "chosen": c.worker_id == d.worker_id,
            })
        })
        .collect();
    let outcome = entry.outcome.as_ref().map(|o| {
        let moves: Vec<Value> = o
            .moves
            .iter()
            .map(|m| {
                json!({
                    "from_worker_id": m.from_worker_id, "from_pool": m.from_pool,
                    "to_worker_id": m.to_worker_id, "to_pool": m.to_pool,
                    "reason": m.reason, "at_token": m.at_token, "at_unix_ms": m.at_unix_ms,
                })
            })
            .collect();
        json!({
            "at_unix_ms": o.at_unix_ms, "status": o.status,
            "worker_id": o.worker_id, "pool": o.pool,
            "ttft_ms": o.ttft_ms, "itl_ms": o.itl_ms, "total_ms": o.total_ms,
            "prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "cached_prompt_tokens": o.cached_prompt_tokens,
            "slo_met": o.slo_met, "failovers": o.failovers, "error": o.error,
            "cost_usd": o.cost_usd,
            "predicted_ttft_ms": o.predicted_ttft_ms, "placed_ttft_ms": o.placed_ttft_ms,
            "best_alternative_ttft_ms": o.best_alternative_ttft_ms,
            "best_alternative_worker_id": o.best_alternative_worker_id,
            "regret_ms": o.regret_ms, "cost_regret_usd": o.cost_regret_usd,
            "moves": moves,
        })
    });
    json!({
        "id": entry.id,
        "seq": entry.seq,
        "request_id": d.request_id,
        "router_id": d.router_id,
        "at_unix_ms": d.at_unix_ms,
        "tenant": d.tenant,
        "model": d.model,
        "lane": d.lane,
        "lane_origin": d.lane_origin,
        "lane_detail": d.lane_detail,
        "ttft_slo_ms": d.ttft_slo_ms,
        "prompt_tokens": d.prompt_tokens,
        "candidates": candidates,
        "worker_id": d.worker_id,
        "pool": d.pool,
        "reason": d.reason,
        "reason_text": d.reason_text,
        "predicted_ttft_ms": d.predicted_ttft_ms,
        "queued_ms": d.queued_ms,
        "outcome": outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(id: &str) -> v1::RoutingDecision {
        v1::RoutingDecision {
            request_id: id.into(),
            router_id: "r".into(),
            lane: "latency-critical".into(),
            worker_id: "wse-0".into(),
            candidates: vec![v1::RoutingCandidate {
                worker_id: "wse-0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn outcome(id: &str) -> v1::RequestOutcome {
        v1::RequestOutcome {
            request_id: id.into(),
            status: "completed".into(),
            ttft_ms: 12.0,
            regret_ms: Some(3.0),
            moves: vec![v1::MoveRecord {
                from_worker_id: "gpu-0".into(),
                to_worker_id: "gpu-1".into(),
                reason: "drain".into(),
                at_token: 37,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn outcomes_complete_their_decision_and_show_up_as_changes() {
        let feed = Decisions::default();
        feed.add(0, decision("a"));
        feed.add(0, decision("b"));
        let first = feed.page(Some(0), 0, None, 100);
        assert_eq!(first.entries.len(), 2);
        assert_eq!(first.entries[0]["candidates"][0]["chosen"], true);
        feed.complete(0, "r", outcome("a"));
        // Another router's request of the same id is not this one.
        feed.complete(0, "other", outcome("b"));
        let changes = feed.page(Some(0), first.seq, None, 100);
        assert_eq!(changes.entries.len(), 1);
        assert_eq!(changes.entries[0]["request_id"], "a");
        assert_eq!(changes.entries[0]["outcome"]["ttft_ms"], 12.0);
        assert_eq!(changes.entries[0]["outcome"]["regret_ms"], 3.0);
        assert!(changes.entries[0]["outcome"]["cost_regret_usd"].is_null());
        let moved = &changes.entries[0]["outcome"]["moves"][0];
        assert_eq!(
            (&moved["reason"], &moved["to_worker_id"], &moved["at_token"]),
            (&json!("drain"), &json!("gpu-1"), &json!(37))
        );
        assert!(
            feed.page(Some(0), changes.seq, None, 100)
                .entries
                .is_empty()
        );
        let b = feed.page(Some(0), 0, Some("b"), 100);
        assert_eq!(b.entries.len(), 1);
        assert!(b.entries[0]["outcome"].is_null());
    }

    #[test]
    fn the_feed_is_bounded_and_pages_keep_the_newest() {
        let feed = Decisions::default();
        for i in 0..RECENT + 20 {
            feed.add(0, decision(&i.to_string()));
        }
        assert_eq!(feed.len(), RECENT);
        let page = feed.page(None, 0, None, 10);
        assert_eq!(page.entries.len(), 10);
        assert_eq!(
            page.entries[9]["request_id"],
            (RECENT + 19).to_string().as_str()
        );
        assert!(feed.page(None, 0, Some("3"), 10).entries.is_empty());
    }

    #[test]
    fn a_new_term_starts_a_new_feed_and_a_cursor_beyond_it_starts_over() {
        let feed = Decisions::default();
        for i in 0..7 {
            feed.add(1_000, decision(&format!("old-{i}")));
        }
        let old = feed.page(Some(1_000), 0, None, 100);
        assert_eq!((old.seq, old.epoch, old.reset), (7, 1_000, false));
        // This replica leads again (another term): the feed starts over, empty at first, and
        // the old cursor is beyond it.
        let fresh = feed.page(Some(2_000), old.seq, None, 100);
        assert_eq!((fresh.seq, fresh.epoch, fresh.reset), (0, 2_000, true));
        assert!(fresh.entries.is_empty());
        feed.add(2_000, decision("new-0"));
        feed.add(2_000, decision("new-1"));
        // The old feed's outcome reported now finds no decision of its request.
        feed.complete(2_000, "r", outcome("old-3"));
        let page = feed.page(Some(2_000), old.seq, None, 100);
        assert!(page.reset, "a cursor of the old feed");
        let ids: Vec<_> = page
            .entries
            .iter()
            .map(|e| e["request_id"].clone())
            .collect();
        assert_eq!(ids, [json!("new-0"), json!("new-1")]);
        assert_eq!(page.entries[0]["id"], 1, "ids start over");
        // A cursor within the feed is no reset.
        let next = feed.page(Some(2_000), 1, None, 100);
        assert!(!next.reset);
        assert_eq!(next.entries.len(), 1);
        // An old cursor that happens to fall within the new feed: its epoch tells.
        let mine = Cursor {
            epoch: Some(2_000),
            since: 1,
        };
        assert_eq!(feed.page(Some(2_000), mine, None, 100).entries.len(), 1);
        let stale = Cursor {
            epoch: Some(1_000),
            since: 1,
        };
        let page = feed.page(Some(2_000), stale, None, 100);
        assert!(page.reset);
        assert_eq!(page.entries.len(), 2);
        // A replica that does not lead answers the feed it has, as it is.
        let kept = feed.page(None, 0, None, 100);
        assert_eq!((kept.epoch, kept.entries.len()), (2_000, 2));
    }
}
