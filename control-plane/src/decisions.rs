//! The live decision feed: the most recent routing decisions routers reported (sampled under
//! load), each completed by its outcome when the request ends. Bounded to [`RECENT`] entries.
//!
//! Every entry has a stable `id` and a `seq` that grows whenever it changes (created, outcome
//! attached): a client polling `since=<last seq>` gets new decisions and late outcomes alike.

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
    entries: VecDeque<Entry>,
    next_id: u64,
    seq: u64,
    /// Outcomes whose decision was not (or no longer) in the feed.
    unmatched_outcomes: u64,
}

#[derive(Debug, Default)]
pub struct Decisions {
    inner: Mutex<Inner>,
}

/// A page of the feed.
#[derive(Debug)]
pub struct Page {
    pub entries: Vec<Value>,
    /// The highest `seq` in the feed (pass it back as `since`).
    pub seq: u64,
}

impl Decisions {
    pub fn add(&self, decision: v1::RoutingDecision) {
        let mut inner = self.inner.lock().expect("decisions lock");
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

    /// Attaches `outcome` to the latest decision of the same router and request without one.
    pub fn complete(&self, router_id: &str, outcome: v1::RequestOutcome) {
        let mut inner = self.inner.lock().expect("decisions lock");
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

    /// Entries changed after `since`, or those of `request_id` (any age still kept), oldest
    /// first, at most `limit` (the newest).
    pub fn page(&self, since: u64, request_id: Option<&str>, limit: usize) -> Page {
        let inner = self.inner.lock().expect("decisions lock");
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
        feed.add(decision("a"));
        feed.add(decision("b"));
        let first = feed.page(0, None, 100);
        assert_eq!(first.entries.len(), 2);
        assert_eq!(first.entries[0]["candidates"][0]["chosen"], true);
        feed.complete("r", outcome("a"));
        // Another router's request of the same id is not this one.
        feed.complete("other", outcome("b"));
        let changes = feed.page(first.seq, None, 100);
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
        assert!(feed.page(changes.seq, None, 100).entries.is_empty());
        let b = feed.page(0, Some("b"), 100);
        assert_eq!(b.entries.len(), 1);
        assert!(b.entries[0]["outcome"].is_null());
    }

    #[test]
    fn the_feed_is_bounded_and_pages_keep_the_newest() {
        let feed = Decisions::default();
        for i in 0..RECENT + 20 {
            feed.add(decision(&i.to_string()));
        }
        assert_eq!(feed.len(), RECENT);
        let page = feed.page(0, None, 10);
        assert_eq!(page.entries.len(), 10);
        assert_eq!(
            page.entries[9]["request_id"],
            (RECENT + 19).to_string().as_str()
        );
        assert!(feed.page(0, Some("3"), 10).entries.is_empty());
    }
}
