//! Stage 3: where the request runs. The router's placer answers with a worker (its
//! slot held until the start is sent), a place in the lane's queue at the router, or a
//! refusal (shed, unknown model, no worker). A request failing over asks again with the
//! workers that failed it excluded, and is never shed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use switchyard_proto::v1;

use super::{Dispatcher, Target, token_count};
use crate::affinity::affinity_of;
use crate::classify::{Classification, RequestFeatures, TENANT_KEY};
use crate::error::DispatchError;
use crate::placer::{Answer, Ask, Chosen, IfFull};
use crate::policy::stable_hash;
use switchyard_cluster::WorkerRecord;

/// What the next segment of a request needs of its worker's engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Needs {
    /// Any engine serving the model.
    Generation,
    /// One that can score the prompt (`sampling.prompt_logprobs`), until the client has it.
    PromptScored,
    /// One that can embed the prompt (`embed`).
    Embedding,
}

impl Needs {
    /// What a request's first segment needs.
    pub(super) fn of(request: &v1::GenerateRequest) -> Self {
        if request.embed {
            Needs::Embedding
        } else if request.sampling.as_ref().is_some_and(|s| s.prompt_logprobs) {
            Needs::PromptScored
        } else {
            Needs::Generation
        }
    }

    /// What it takes beyond serving the model; `None` for a generation.
    fn capability(self) -> Option<Capability> {
        match self {
            Needs::Generation => None,
            Needs::PromptScored => Some(Capability {
                field: "sampling.prompt_logprobs",
                has: |record| record.scores_prompts,
                what: "score a prompt",
            }),
            Needs::Embedding => Some(Capability {
                field: "embed",
                has: |record| record.embeds,
                what: "embed a prompt",
            }),
        }
    }
}

/// An engine capability a request needs: the request field that asks for it, whether a
/// worker's record says it has it, and what it does (for the refusal).
struct Capability {
    field: &'static str,
    has: fn(&WorkerRecord) -> bool,
    what: &'static str,
}

impl Dispatcher {
    /// The first placement of a request: a worker now, or a wait at the router.
    pub(super) fn place(
        &self,
        request: &v1::GenerateRequest,
        prompt_ids: &[u32],
        class: &Classification,
        trace: bool,
    ) -> Result<Target, DispatchError> {
        let needs = Needs::of(request);
        let ask = self.ask(request, prompt_ids, class, Vec::new(), needs, trace)?;
        Ok(match self.placer.place(ask, IfFull::Queue)? {
            Answer::Placed(chosen) => Target::Placed(chosen),
            Answer::Queued(ticket) => Target::Queued(ticket),
        })
    }

    /// Another worker for a started request, none of `excluded`: when every other worker is
    /// full, the least utilised one takes it anyway (a started request is not shed).
    pub(super) fn replace(
        &self,
        request: &v1::GenerateRequest,
        prompt_ids: &[u32],
        class: &Classification,
        excluded: Vec<String>,
        needs: Needs,
    ) -> Result<Chosen, DispatchError> {
        let ask = self.ask(request, prompt_ids, class, excluded, needs, false)?;
        match self.placer.place(ask, IfFull::Fallback)? {
            Answer::Placed(chosen) => Ok(chosen),
            Answer::Queued(_) => unreachable!("a fallback placement never queues"),
        }
    }

    /// What the placer needs to know of a request. The prefix index is looked up here,
    /// before the placer's lock is taken, so the lock is held only to decide. A prompt to
    /// score or embed goes only to workers that can; when none serving its model can, it is
    /// refused naming the field.
    fn ask(
        &self,
        request: &v1::GenerateRequest,
        prompt_ids: &[u32],
        class: &Classification,
        mut excluded: Vec<String>,
        needs: Needs,
        trace: bool,
    ) -> Result<Ask, DispatchError> {
        if let Some(Capability { field, has, what }) = needs.capability() {
            let (cannot, can) = self.links.capable(&request.model, has);
            if can == 0 && !cannot.is_empty() {
                return Err(DispatchError::invalid(
                    field,
                    format!(
                        "no worker serving model {:?} can {what} (GPU workers running the \
                         model can; wafer-scale gateways cannot)",
                        request.model
                    ),
                ));
            }
            excluded.extend(cannot);
        }
        let prefix = (!prompt_ids.is_empty()).then(|| {
            self.links
                .prefix_lookup(prompt_ids)
                .into_iter()
                .map(|hit| (hit.worker, hit.cached_tokens))
                .collect()
        });
        let prompt_tokens = if prompt_ids.is_empty() {
            RequestFeatures::of(request).prompt_tokens
        } else {
            token_count(prompt_ids)
        };
        Ok(Ask {
            request_id: request.request_id.clone(),
            model: request.model.clone(),
            class: class.clone(),
            prompt_tokens,
            affinity: affinity_of(request),
            seed: stable_hash(&request.request_id) ^ self.next_seed.fetch_add(1, Ordering::Relaxed),
            prefix,
            excluded,
            trace,
            tenant: request
                .metadata
                .get(TENANT_KEY)
                .filter(|t| !t.is_empty())
                .cloned(),
        })
    }

    /// Reports a sampled request's placement to the control plane, after it `waited` at the
    /// router for a slot.
    pub(super) fn report_decision(
        &self,
        request: &v1::GenerateRequest,
        class: &Classification,
        prompt_ids: &[u32],
        chosen: &Chosen,
        waited: Duration,
    ) {
        let record = chosen.link.record();
        let mut decision =
            super::finish::decision_record(self.reports.router_id(), request, class, prompt_ids);
        decision.worker_id = record.id.clone();
        decision.pool = record.pool.to_string();
        decision.reason = chosen.reason_label.into();
        decision.reason_text = format!("{}; {}", class.reason, chosen.reason);
        decision.predicted_ttft_ms = chosen.predicted_ttft_ms;
        decision.queued_ms = waited.as_secs_f64() * 1e3;
        decision.candidates = chosen.candidates.clone();
        self.reports.decision(decision);
    }
}
