//! Stage 5: the end of a request — its last frame (`Finished` with usage and timings), the
//! request metrics, and the outcome report to the control plane (with the counterfactual
//! ledger's verdict); or, for a request that never reached a worker, its refusal counted and
//! reported.

use std::time::Duration;

use switchyard_proto::v1::{self, server_frame::Frame};
use tokio::time::Instant;
use tonic::Code;

use super::run::{Run, send};
use super::{Dispatcher, FrameSink, token_count};
use crate::classify::{Classification, RequestFeatures};
use crate::error::DispatchError;
use crate::policy::document::LaneName;
use crate::report::{self, Ended, LedgerEntry, ledger};

impl Dispatcher {
    /// Counts and reports a request that never reached a worker.
    pub(super) fn unplaced(
        &self,
        request: &v1::GenerateRequest,
        class: &Classification,
        prompt_ids: &[u32],
        error: &DispatchError,
        sampled: bool,
        arrived: Instant,
    ) {
        let refusal = Refusal::of(error);
        self.count_unplaced(class.lane, &request.model, refusal);
        self.metrics.tenant_usage(
            self.tenant_label(request),
            refusal.as_str(),
            &v1::Usage::default(),
        );
        self.report_unplaced(
            request,
            class,
            prompt_ids,
            (error, refusal),
            sampled,
            arrived,
        );
    }

    /// Counts a request that never reached a worker.
    fn count_unplaced(&self, lane: LaneName, model: &str, refusal: Refusal) {
        if refusal == Refusal::Shed {
            self.metrics.shed(lane);
        }
        // An unknown model is the client's word, not ours: keep it out of the label values.
        let model = if refusal == Refusal::Invalid {
            ""
        } else {
            model
        };
        self.metrics.request(lane, None, model, refusal.as_str());
    }

    /// Reports a request that never reached a worker (shed or refused).
    fn report_unplaced(
        &self,
        request: &v1::GenerateRequest,
        class: &Classification,
        prompt_ids: &[u32],
        (error, refusal): (&DispatchError, Refusal),
        sampled: bool,
        arrived: Instant,
    ) {
        let shed = refusal == Refusal::Shed;
        let label = if shed { "shed" } else { "rejected" };
        if sampled {
            let mut decision =
                decision_record(self.reports.router_id(), request, class, prompt_ids);
            decision.reason = label.into();
            decision.reason_text = format!("{}; {label}: {error}", class.reason);
            decision.queued_ms = arrived.elapsed().as_secs_f64() * 1e3;
            self.reports.decision(decision);
        }
        self.reports.ended(Ended {
            lane: class.lane,
            outcome: v1::RequestOutcome {
                request_id: request.request_id.clone(),
                at_unix_ms: report::now_unix_ms(),
                status: label.into(),
                total_ms: arrived.elapsed().as_secs_f64() * 1e3,
                prompt_tokens: token_count(prompt_ids),
                error: error.to_string(),
                ..Default::default()
            },
            cancelled: false,
            shed,
            sampled,
            ledger: None,
        });
    }
}

impl Dispatcher {
    /// Counts and reports a request its client cancelled while it waited at the router.
    pub(super) fn cancelled_waiting(
        &self,
        request: &v1::GenerateRequest,
        class: &Classification,
        prompt_ids: &[u32],
        sampled: bool,
        arrived: Instant,
    ) {
        self.metrics
            .queued(class.lane, arrived.elapsed(), "cancelled");
        self.metrics
            .request(class.lane, None, &request.model, "cancelled");
        self.reports.ended(Ended {
            lane: class.lane,
            outcome: v1::RequestOutcome {
                request_id: request.request_id.clone(),
                at_unix_ms: report::now_unix_ms(),
                status: "cancelled".into(),
                total_ms: arrived.elapsed().as_secs_f64() * 1e3,
                prompt_tokens: token_count(prompt_ids),
                ..Default::default()
            },
            cancelled: true,
            shed: false,
            sampled,
            ledger: None,
        });
    }
}

/// The last frame of a request cancelled before it reached a worker.
pub(super) fn cancelled_frame(request_id: &str, arrived: Instant) -> v1::ServerFrame {
    let waited_ms = arrived.elapsed().as_secs_f64() * 1e3;
    v1::ServerFrame {
        frame: Some(Frame::Finished(v1::Finished {
            request_id: request_id.to_string(),
            reason: v1::FinishReason::Cancelled as i32,
            usage: Some(v1::Usage::default()),
            timings: Some(v1::Timings {
                ttft_ms: 0.0,
                total_ms: waited_ms,
                queue_ms: waited_ms,
            }),
            // It reached no worker.
            ..Default::default()
        })),
    }
}

/// When a request was answered: its first token; for a reply that completed without a token
/// (the model stopped at once), when it ended (it counted as an SLO miss at 0 ms); never for
/// one that failed or was cancelled before a token.
fn answered_at(first_token: Option<Instant>, completed: bool, now: Instant) -> Option<Instant> {
    first_token.or(completed.then_some(now))
}

impl Run<'_> {
    pub(super) fn report(&self, outcome: &str, error: Option<&DispatchError>, sampled: bool) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let now = Instant::now();
        let total_ms = ms(now - self.arrived);
        let answered = answered_at(self.first_token, outcome == "completed", now);
        let ttft_ms = answered.map_or(0.0, |t| ms(t - self.arrived));
        let itl_ms = match (self.first_token, self.last_token) {
            (Some(first), Some(last)) if self.delivered > 1 => {
                ms(last - first) / f64::from(self.delivered - 1)
            }
            _ => 0.0,
        };
        let shed = error.is_some_and(|s| s.code() == Code::ResourceExhausted);
        let prompt_tokens = if self.prompt_tokens > 0 {
            self.prompt_tokens
        } else {
            token_count(&self.prompt_ids)
        };
        let tokens = f64::from(prompt_tokens) + f64::from(self.completion_tokens());
        let cost_usd = tokens * self.cost_per_mtok / 1e6;
        let slo_met = answered.is_some() && ttft_ms <= self.class.ttft_slo_ms;
        let placed_ttft_ms = answered.map_or(0.0, |t| ms(t - self.placed));
        // Judged only when its first worker served it: the prediction was for that one.
        let judged = (self.first_token.is_some() && self.attempts == 1).then(|| {
            self.alternatives.judge(ledger::Verdict {
                actual_ms: placed_ttft_ms,
                predicted_ms: self.predicted_ttft_ms,
                slo_ms: self.class.ttft_slo_ms,
                slo_met,
                cost_usd,
                tokens,
            })
        });
        let (best_alternative_worker_id, best_alternative_ttft_ms) = self
            .alternatives
            .best_alternative
            .clone()
            .unwrap_or_default();
        self.dispatcher.reports.ended(Ended {
            lane: self.class.lane,
            outcome: v1::RequestOutcome {
                request_id: self.request.request_id.clone(),
                at_unix_ms: report::now_unix_ms(),
                status: if shed { "shed" } else { outcome }.into(),
                worker_id: self.worker.clone(),
                pool: self.pool.to_string(),
                ttft_ms,
                itl_ms,
                total_ms,
                prompt_tokens,
                completion_tokens: self.completion_tokens(),
                cached_prompt_tokens: self.cached_prompt_tokens,
                slo_met,
                failovers: self.attempts - 1,
                error: error.map(ToString::to_string).unwrap_or_default(),
                cost_usd,
                predicted_ttft_ms: self.predicted_ttft_ms,
                placed_ttft_ms,
                best_alternative_ttft_ms,
                best_alternative_worker_id,
                regret_ms: judged.map(|j| j.regret_ms),
                cost_regret_usd: judged.map(|j| j.cost_regret_usd),
                moves: self.moved.clone(),
            },
            cancelled: outcome == "cancelled",
            shed,
            sampled,
            ledger: judged
                .filter(|_| self.dispatcher.reports.connected())
                .map(|judged| LedgerEntry {
                    judged,
                    pool: self.pool,
                    tenant: self
                        .request
                        .metadata
                        .get(crate::classify::TENANT_KEY)
                        .cloned()
                        .unwrap_or_default(),
                }),
        });
    }

    /// Sends the request's `Finished`: `reason`, and the worker's `stop_sequence` when one
    /// ended it.
    pub(super) async fn finish(
        &mut self,
        reason: i32,
        stop_sequence: String,
        out: &FrameSink,
    ) -> Result<(), DispatchError> {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        // An embedding's first (and only) answer is its vector, now.
        let answered = self
            .first_token
            .or((!self.embedding.is_empty()).then(Instant::now));
        let finished = Frame::Finished(v1::Finished {
            request_id: self.request.request_id.clone(),
            reason,
            usage: Some(v1::Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens(),
                cached_prompt_tokens: self.cached_prompt_tokens,
            }),
            timings: Some(v1::Timings {
                ttft_ms: answered.map(|t| ms(t - self.arrived)).unwrap_or_default(),
                total_ms: ms(self.arrived.elapsed()),
                queue_ms: ms(self.waited),
            }),
            worker_id: self.worker.clone(),
            pool: self.pool.to_string(),
            stop_sequence,
            embedding: std::mem::take(&mut self.embedding),
        });
        self.release();
        send(out, finished).await
    }
}

/// Why a request never reached a worker, as metrics and reports count it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `RESOURCE_EXHAUSTED` from admission: the cluster is full.
    Shed,
    /// Refused by the tenant's quota: the tenant is over its limits, not the cluster.
    OverQuota,
    /// An invalid request or an unknown model: the client's mistake.
    Invalid,
    /// Any other refusal (no worker, not ready).
    Rejected,
}

impl Refusal {
    fn of(error: &DispatchError) -> Self {
        match error {
            DispatchError::OverQuota(_) => Refusal::OverQuota,
            DispatchError::Shed { .. } => Refusal::Shed,
            DispatchError::Invalid { .. } | DispatchError::UnknownModel(_) => Refusal::Invalid,
            _ => Refusal::Rejected,
        }
    }

    /// The `outcome` label.
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Shed => "shed",
            Refusal::OverQuota => "over_quota",
            Refusal::Invalid | Refusal::Rejected => "rejected",
        }
    }
}

/// A decision report's request part (lane, its origin, SLO); the placement part is the
/// caller's.
pub(super) fn decision_record(
    router_id: &str,
    request: &v1::GenerateRequest,
    class: &Classification,
    prompt_ids: &[u32],
) -> v1::RoutingDecision {
    let (origin, detail) = report::lane_origin(&class.reason);
    v1::RoutingDecision {
        request_id: request.request_id.clone(),
        router_id: router_id.to_string(),
        at_unix_ms: report::now_unix_ms(),
        tenant: request
            .metadata
            .get(crate::classify::TENANT_KEY)
            .cloned()
            .unwrap_or_default(),
        model: request.model.clone(),
        lane: class.lane.as_str().into(),
        lane_origin: origin.into(),
        lane_detail: detail,
        ttft_slo_ms: class.ttft_slo_ms,
        prompt_tokens: if prompt_ids.is_empty() {
            RequestFeatures::of(request).prompt_tokens
        } else {
            token_count(prompt_ids)
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::answered_at;

    #[test]
    fn an_empty_reply_is_answered_when_it_ends() {
        let now = Instant::now();
        let first = now - Duration::from_millis(80);
        assert_eq!(answered_at(Some(first), true, now), Some(first));
        assert_eq!(answered_at(Some(first), false, now), Some(first));
        // No token, completed: answered when it ended.
        assert_eq!(answered_at(None, true, now), Some(now));
        // No token, failed or cancelled: never answered.
        assert_eq!(answered_at(None, false, now), None);
    }
}
