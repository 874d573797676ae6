//! The **fault engine**, for tests only (cargo feature `fault-engine`): no model, scripted
//! misbehaviour. Each generation follows a [`Plan`] — the [`Script`]'s default, or one
//! scripted for its instructions — that sets its pace and its fault: refuse the start with a gRPC
//! code, die after N tokens, stall, wait for a release, or ignore a cancel. The engine records
//! what it was asked ([`FaultEvent`]) so tests can await and assert on it.
//!
//! Token `i` of a generation is a pure function of its instructions (the last user message)
//! and `i` ([`fault_token`]), and a resumed generation continues at `i = resume_tokens.len()`:
//! text spliced across workers must equal an undisturbed run's, token for token.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::engine::{
    Engine, EngineError, EngineEvent, EngineLoad, EngineRequest, EngineStream, Message, Prompt,
    StopReason,
};

/// Events buffered per generation: small, so a generation whose router stops granting credit
/// blocks soon (and says so, see [`FaultEvent::Blocked`]).
const BUFFER: usize = 4;

/// What goes wrong in a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Nothing: `max_tokens` tokens, then `Done`.
    None,
    /// `submit` fails with this code (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`,
    /// `INVALID_ARGUMENT`; anything else is `INTERNAL`).
    Refuse(tonic::Code),
    /// After this many tokens the worker goes away: [`FaultEngine::died`] fires (the test
    /// harness stops the worker's runtime, closing its sockets) and the generation sends
    /// nothing more.
    DieAfter(usize),
    /// After this many tokens, nothing for this long, then the rest.
    StallAfter(usize, Duration),
    /// After this many tokens, nothing until [`FaultEngine::release`], then the rest.
    HoldAfter(usize),
    /// After this many tokens, one whole call of [`FAULT_TOOL`] ([`fault_call`] of the
    /// token's index), spelt by the next token, then as [`Fault::HoldAfter`].
    CallThenHold(usize),
    /// Every token spells a whole call of [`FAULT_TOOL`] ([`fault_call`] of its index, call
    /// index the token's), and no text: a burst of call pieces.
    CallEach,
    /// A cancel is recorded but never confirmed: the tokens keep coming to `max_tokens`, and
    /// no `Done` ever follows.
    IgnoreCancel,
    /// Tokens come this many to an event, as a gateway passes on an upstream chunk that holds
    /// several (a character spelt by two byte tokens): one event with their text and the
    /// last one's id, while `Done` counts every token.
    Packed(usize),
}

/// How one generation runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Pause before each token (zero: as fast as the worker takes them).
    pub pace: Duration,
    pub fault: Fault,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            pace: Duration::from_millis(5),
            fault: Fault::None,
        }
    }
}

impl Plan {
    pub fn fault(fault: Fault) -> Self {
        Self {
            fault,
            ..Self::default()
        }
    }

    pub fn paced(mut self, pace: Duration) -> Self {
        self.pace = pace;
        self
    }
}

/// What the engine was asked and did, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultEvent {
    /// A `submit` (refused ones too).
    Start {
        request_id: String,
        /// The chat messages, or one `user` message holding a text prompt.
        messages: Vec<Message>,
        resume_tokens: Vec<u32>,
        latency_critical: bool,
        /// The decode rate its lane promises (`EngineRequest::min_tokens_per_s`).
        min_tokens_per_s: f64,
        max_tokens: u32,
        refused: bool,
    },
    /// The generation's cancel token fired (router cancel, or its stream to the router closed).
    Cancelled { request_id: String },
    /// A token had to wait for the worker to take it (its credit ran out).
    Blocked { request_id: String },
    /// `Done` was sent.
    Done {
        request_id: String,
        reason: StopReason,
        /// Tokens sent by this generation.
        tokens: usize,
    },
    /// [`Fault::DieAfter`] fired after this generation sent `tokens`.
    Died { request_id: String, tokens: usize },
}

impl FaultEvent {
    pub fn request_id(&self) -> &str {
        match self {
            FaultEvent::Start { request_id, .. }
            | FaultEvent::Cancelled { request_id }
            | FaultEvent::Blocked { request_id }
            | FaultEvent::Done { request_id, .. }
            | FaultEvent::Died { request_id, .. } => request_id,
        }
    }
}

/// Token `index` of a generation for `instructions`: `(id, text)`. The text names the index,
/// so a lost or repeated token shows in the output.
pub fn fault_token(instructions: &str, index: usize) -> (u32, String) {
    let seed = instructions.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    });
    let id = seed.wrapping_add(index as u32).wrapping_mul(2_654_435_761) % 49_152;
    (id, format!(" t{index}"))
}

/// The vector an embedding request for `instructions` answers with: the synthetic engine's
/// word hash, so a test can predict it.
pub fn fault_embedding(instructions: &str) -> Vec<f32> {
    crate::synthetic::synthetic_embedding(instructions)
}

/// The tool a [`Fault::CallThenHold`] generation calls.
pub const FAULT_TOOL: &str = "lookup";

/// The call a [`Fault::CallThenHold`] generation makes in place of token `index`.
pub fn fault_call(index: usize) -> v1::ToolCall {
    v1::ToolCall {
        id: format!("call_{index}"),
        name: FAULT_TOOL.into(),
        arguments: format!(r#"{{"at":{index}}}"#),
    }
}

/// Text of tokens `start..start + count` for `instructions`.
pub fn fault_text(instructions: &str, start: usize, count: usize) -> String {
    (start..start + count)
        .map(|i| fault_token(instructions, i).1)
        .collect()
}

/// Ids of tokens `start..start + count` for `instructions`.
pub fn fault_ids(instructions: &str, start: usize, count: usize) -> Vec<u32> {
    (start..start + count)
        .map(|i| fault_token(instructions, i).0)
        .collect()
}

/// Which plan each generation follows, by its instructions; shared by the engines of a test
/// cluster, so "the first start of this request dies, the next one runs" holds whichever worker
/// each start lands on.
#[derive(Debug, Default)]
pub struct Script {
    default: Mutex<Plan>,
    plans: Mutex<HashMap<String, VecDeque<Plan>>>,
}

impl Script {
    pub fn new(default: Plan) -> Arc<Self> {
        Arc::new(Self {
            default: Mutex::new(default),
            plans: Mutex::default(),
        })
    }

    /// The plan of generations nothing is scripted for.
    pub fn set_default(&self, plan: Plan) {
        *self.default.lock().expect("script lock") = plan;
    }

    /// The plans of successive starts for `instructions`, on any engine sharing this script;
    /// the last one stays for every later start.
    pub fn set(&self, instructions: &str, plans: impl IntoIterator<Item = Plan>) {
        self.plans
            .lock()
            .expect("script lock")
            .insert(instructions.to_string(), plans.into_iter().collect());
    }

    fn next(&self, instructions: &str) -> Plan {
        let mut plans = self.plans.lock().expect("script lock");
        match plans.get_mut(instructions) {
            Some(queue) if queue.len() > 1 => queue.pop_front().expect("not empty"),
            Some(queue) if !queue.is_empty() => queue[0].clone(),
            _ => self.default.lock().expect("script lock").clone(),
        }
    }
}

#[derive(Debug)]
pub struct FaultEngine {
    models: Vec<String>,
    max_concurrent: u32,
    script: Arc<Script>,
    events: Arc<watch::Sender<Vec<FaultEvent>>>,
    released: Arc<watch::Sender<bool>>,
    died: CancellationToken,
    /// Reported in every load report (0 = not reported).
    prefill_tokens_per_s: f64,
}

impl FaultEngine {
    /// An engine serving `model` with `max_concurrent` slots (advertised: it runs whatever it
    /// is sent) whose generations follow `script`.
    pub fn new(model: &str, max_concurrent: u32, script: Arc<Script>) -> Self {
        Self {
            models: vec![model.to_string()],
            max_concurrent,
            script,
            events: Arc::new(watch::channel(Vec::new()).0),
            released: Arc::new(watch::channel(false).0),
            died: CancellationToken::new(),
            prefill_tokens_per_s: 0.0,
        }
    }

    /// Reports this prefill rate to the router (as a real engine reports its measured one),
    /// so placement predicts a time to first token for it rather than assuming its default.
    pub fn with_prefill_rate(mut self, tokens_per_s: f64) -> Self {
        self.prefill_tokens_per_s = tokens_per_s;
        self
    }

    /// Lets every [`Fault::HoldAfter`] generation of this engine (now and later) go on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// Fires when a [`Fault::DieAfter`] generation reaches its count.
    pub fn died(&self) -> CancellationToken {
        self.died.clone()
    }

    /// Everything recorded so far.
    pub fn events(&self) -> Vec<FaultEvent> {
        self.events.borrow().clone()
    }

    /// Waits until the recorded events satisfy `done`, and returns them.
    pub async fn wait_until(&self, done: impl Fn(&[FaultEvent]) -> bool) -> Vec<FaultEvent> {
        let mut events = self.events.subscribe();
        let seen = events.wait_for(|e| done(e)).await.expect("engine alive");
        seen.clone()
    }
}

fn record(events: &watch::Sender<Vec<FaultEvent>>, event: FaultEvent) {
    events.send_modify(|e| e.push(event));
}

impl Engine for FaultEngine {
    fn kind(&self) -> &'static str {
        "fault"
    }

    fn models(&self) -> Vec<String> {
        self.models.clone()
    }

    fn embeds(&self) -> bool {
        true
    }

    fn max_concurrent(&self) -> u32 {
        self.max_concurrent
    }

    fn tokens_per_s(&self) -> f64 {
        100.0
    }

    fn hardware(&self) -> String {
        "fault-injection test engine (no model)".into()
    }

    fn load(&self) -> EngineLoad {
        EngineLoad {
            prefill_tokens_per_s: self.prefill_tokens_per_s,
            ..EngineLoad::default()
        }
    }

    fn submit(
        &self,
        request: EngineRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        let instructions = request.prompt.instructions().to_string();
        let plan = self.script.next(&instructions);
        let refusal = match plan.fault {
            Fault::Refuse(code) => Some(code),
            _ => None,
        };
        let messages = match &request.prompt {
            Prompt::Chat(messages) => messages.clone(),
            Prompt::Text(text) => vec![Message {
                role: "user".into(),
                content: text.clone(),
                ..Default::default()
            }],
        };
        record(
            &self.events,
            FaultEvent::Start {
                request_id: request.request_id.clone(),
                messages,
                resume_tokens: request.resume_tokens.clone(),
                latency_critical: request.latency_critical,
                min_tokens_per_s: request.min_tokens_per_s,
                max_tokens: request.sampling.max_tokens,
                refused: refusal.is_some(),
            },
        );
        if let Some(code) = refusal {
            let message = format!(
                "fault engine refuses {:?} with {code:?}",
                request.request_id
            );
            return Err(match code {
                tonic::Code::Unavailable => EngineError::Unavailable(message),
                tonic::Code::ResourceExhausted => EngineError::ResourceExhausted(message),
                tonic::Code::InvalidArgument => EngineError::InvalidArgument(message),
                _ => EngineError::Internal(message),
            });
        }
        let (tx, rx) = mpsc::channel(BUFFER);
        let generation = Generation {
            request_id: request.request_id,
            instructions,
            start: request.resume_tokens.len(),
            max_tokens: request.sampling.max_tokens as usize,
            embed: request.embed,
            plan,
            events: self.events.clone(),
            released: self.released.subscribe(),
            died: self.died.clone(),
        };
        tokio::spawn(generation.run(cancel, tx));
        Ok(rx.into())
    }
}

struct Generation {
    request_id: String,
    instructions: String,
    start: usize,
    max_tokens: usize,
    /// An embedding request: [`fault_embedding`] of the instructions instead of tokens (a
    /// [`Fault::DieAfter`]`(0)` dies before it).
    embed: bool,
    plan: Plan,
    events: Arc<watch::Sender<Vec<FaultEvent>>>,
    released: watch::Receiver<bool>,
    died: CancellationToken,
}

type Sender = mpsc::Sender<Result<EngineEvent, EngineError>>;

impl Generation {
    async fn run(mut self, cancel: CancellationToken, tx: Sender) {
        let ignores_cancel = self.plan.fault == Fault::IgnoreCancel;
        let watch_cancel = {
            let (cancel, events, id) =
                (cancel.clone(), self.events.clone(), self.request_id.clone());
            tokio::spawn(async move {
                cancel.cancelled().await;
                record(&events, FaultEvent::Cancelled { request_id: id });
            })
        };
        let mut sent = 0;
        // Text of tokens made but not yet sent (a [`Fault::Packed`] event's first tokens).
        let mut packed = String::new();
        let reason = 'generate: {
            if self.embed {
                if self.plan.fault == Fault::DieAfter(0) {
                    return self.die(sent).await;
                }
                let vector = fault_embedding(&self.instructions);
                if !self.deliver(EngineEvent::Embedding(vector), &tx).await {
                    return;
                }
                break 'generate StopReason::Stop;
            }
            for index in self.start..self.max_tokens {
                let paused = match self.plan.fault {
                    Fault::DieAfter(n) if sent == n => return self.die(sent).await,
                    Fault::StallAfter(n, stall) if sent == n => Some(tokio::time::sleep(stall)),
                    Fault::CallThenHold(n) if sent == n => {
                        // The call takes token `index`'s place.
                        if !self.call(index, 0, &tx).await {
                            return;
                        }
                        sent += 1;
                        tokio::select! {
                            _ = self.released.wait_for(|r| *r) => {}
                            _ = cancel.cancelled(), if !ignores_cancel => break 'generate StopReason::Cancelled,
                        }
                        continue;
                    }
                    Fault::CallEach => {
                        if !self.call(index, index as u32, &tx).await {
                            return;
                        }
                        sent += 1;
                        continue;
                    }
                    Fault::HoldAfter(n) if sent == n => {
                        tokio::select! {
                            _ = self.released.wait_for(|r| *r) => {}
                            _ = cancel.cancelled(), if !ignores_cancel => break 'generate StopReason::Cancelled,
                        }
                        None
                    }
                    _ => None,
                };
                let pause = async {
                    if let Some(stall) = paused {
                        stall.await;
                    }
                    if !self.plan.pace.is_zero() {
                        tokio::time::sleep(self.plan.pace).await;
                    }
                };
                tokio::select! {
                    _ = pause => {}
                    _ = cancel.cancelled(), if !ignores_cancel => break 'generate StopReason::Cancelled,
                }
                let (id, text) = fault_token(&self.instructions, index);
                if let Fault::Packed(per_event) = self.plan.fault {
                    let made = index + 1 - self.start;
                    if !made.is_multiple_of(per_event.max(1)) && index + 1 < self.max_tokens {
                        packed.push_str(&text);
                        sent += 1;
                        continue;
                    }
                }
                let token = EngineEvent::Token {
                    id,
                    text: std::mem::take(&mut packed) + &text,
                    logprobs: None,
                };
                if !self.deliver(token, &tx).await {
                    return;
                }
                sent += 1;
            }
            StopReason::Length
        };
        if ignores_cancel && cancel.is_cancelled() {
            // Never confirmed: the worker keeps waiting for this generation's end.
            return std::future::pending().await;
        }
        if cancel.is_cancelled() {
            // The cancel is on record before its confirmation.
            let _ = watch_cancel.await;
        } else {
            watch_cancel.abort();
        }
        let done = EngineEvent::Done {
            reason,
            prompt_tokens: 1,
            completion_tokens: (self.start + sent) as u32,
            cached_prompt_tokens: 0,
        };
        if tx.send(Ok(done)).await.is_ok() {
            record(
                &self.events,
                FaultEvent::Done {
                    request_id: self.request_id,
                    reason,
                    tokens: sent,
                },
            );
        }
    }
}

impl Generation {
    /// The worker goes away with this generation unfinished, after it sent `tokens`.
    async fn die(&self, tokens: usize) {
        record(
            &self.events,
            FaultEvent::Died {
                request_id: self.request_id.clone(),
                tokens,
            },
        );
        self.died.cancel();
        std::future::pending().await
    }

    /// Sends [`fault_call`] of token `index` as call `call_index`, as an engine that generates
    /// calls as tokens does: the call, and the token that spelt it (no text). `false`: the
    /// worker stopped listening.
    async fn call(&self, index: usize, call_index: u32, tx: &Sender) -> bool {
        let call = fault_call(index);
        let piece = v1::ToolCallDelta {
            index: call_index,
            id: call.id,
            name: call.name,
            arguments: call.arguments,
        };
        let (id, _) = fault_token(&self.instructions, index);
        let token = EngineEvent::Token {
            id,
            text: String::new(),
            logprobs: None,
        };
        self.deliver(EngineEvent::ToolCall(piece), tx).await && self.deliver(token, tx).await
    }

    /// Sends `event`, recording [`FaultEvent::Blocked`] when it has to wait for the worker to
    /// take it. `false`: the worker stopped listening.
    async fn deliver(&self, event: EngineEvent, tx: &Sender) -> bool {
        let event = match tx.try_send(Ok(event)) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(event)) => event,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
        };
        record(
            &self.events,
            FaultEvent::Blocked {
                request_id: self.request_id.clone(),
            },
        );
        tx.send(event).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Sampling;

    fn request(instructions: &str, max_tokens: u32, resume: usize) -> EngineRequest {
        EngineRequest {
            request_id: "r".into(),
            model: "fault".into(),
            prompt: Prompt::Text(instructions.into()),
            sampling: Sampling {
                max_tokens,
                ..Default::default()
            },
            resume_tokens: fault_ids(instructions, 0, resume),
            latency_critical: false,
            min_tokens_per_s: 0.0,
            prompt_ids: None,
            tools: Default::default(),
            embed: false,
        }
    }

    async fn text(mut rx: EngineStream) -> (String, Option<EngineEvent>) {
        let mut text = String::new();
        while let Some(event) = rx.recv().await {
            match event.expect("no error") {
                EngineEvent::Token { text: t, .. } => text.push_str(&t),
                done => return (text, Some(done)),
            }
        }
        (text, None)
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_plans_follow_each_other_and_a_resume_continues_the_same_text() {
        let script = Script::new(Plan::default());
        script.set(
            "x",
            [
                Plan::fault(Fault::Refuse(tonic::Code::Unavailable)),
                Plan::default(),
            ],
        );
        let engine = FaultEngine::new("fault", 1, script);
        let refused = engine.submit(request("x", 6, 0), CancellationToken::new());
        assert_eq!(
            refused.map(|_| ()).map_err(|e| e.code()),
            Err(tonic::Code::Unavailable)
        );
        let rx = engine
            .submit(request("x", 6, 2), CancellationToken::new())
            .expect("the next plan runs");
        let (resumed, done) = text(rx).await;
        assert_eq!(fault_text("x", 0, 2) + &resumed, fault_text("x", 0, 6));
        assert!(matches!(
            done,
            Some(EngineEvent::Done {
                reason: StopReason::Length,
                completion_tokens: 6,
                ..
            })
        ));
        // The last plan stays.
        assert!(
            engine
                .submit(request("x", 1, 0), CancellationToken::new())
                .is_ok()
        );
        let starts = engine
            .events()
            .iter()
            .filter(|e| matches!(e, FaultEvent::Start { .. }))
            .count();
        assert_eq!(starts, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ignored_cancel_is_recorded_and_never_confirmed() {
        let script = Script::new(Plan::fault(Fault::IgnoreCancel));
        let engine = FaultEngine::new("fault", 1, script);
        let cancel = CancellationToken::new();
        let mut rx = engine.submit(request("y", 3, 0), cancel.clone()).unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(Ok(EngineEvent::Token { .. }))
        ));
        cancel.cancel();
        engine
            .wait_until(|e| e.iter().any(|e| matches!(e, FaultEvent::Cancelled { .. })))
            .await;
        let mut after = 0;
        let confirmed = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(event) = rx.recv().await {
                match event.expect("no error") {
                    EngineEvent::Token { .. } => after += 1,
                    done => return Some(done),
                }
            }
            None
        })
        .await;
        assert!(
            confirmed.is_err(),
            "neither confirmed nor closed: {confirmed:?}"
        );
        assert_eq!(after, 2, "the tokens went on to max_tokens");
    }
}
