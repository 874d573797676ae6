//! Stage 4: the request runs, one segment (a generation on one worker) after another. Tokens
//! go to the client with gap-free sequence numbers and flow-control credit goes back to the
//! worker; the client's `Cancel` and `Interrupt` reach the worker; after each segment the
//! pure [`after`] decides what comes next — finish, continue redirected (on the same worker
//! when it can), or fail over to another worker that resumes after the tokens the client
//! already has.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use switchyard_cluster::Pool;
use switchyard_cluster::telemetry::propagation;
use switchyard_proto::v1::{self, server_frame::Frame, worker_frame};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Code;
use tracing::{Span, debug, info, warn};

use super::span::record_decision;
use super::{Control, Dispatcher, FrameSink, Held, token_count};
use crate::classify::Classification;
use crate::error::DispatchError;
use crate::links::{Link, LinkEvent, LinkEvents, SlotHold};
use crate::metrics::{StreamLabels, StreamMetrics, lane_label, pool_label};
use crate::placer::{Chosen, Hedge, ListedRun, Listing, MoveOrder, Pace};
use crate::policy::moves::MoveReason;
use crate::report::ledger;

/// State of one client request across worker generations (segments).
pub(super) struct Run<'d> {
    pub(super) dispatcher: &'d Dispatcher,
    /// The placed worker's slot, held until the next segment's start is sent.
    pub(super) slot: Option<SlotHold>,
    pub(super) request: v1::GenerateRequest,
    /// See [`Prepared`]; tokenized again when an interrupt rewrites the conversation.
    pub(super) prompt_ids: Vec<u32>,
    pub(super) class: Classification,
    pub(super) lane: v1::Lane,
    pub(super) reason: String,
    pub(super) arrived: Instant,
    /// When the request got its first worker (after any wait at the router for a slot).
    pub(super) placed: Instant,
    /// How long it waited at the router for a slot (`Timings.queue_ms`): zero when placed at
    /// once, however long its task then took to be polled.
    pub(super) waited: Duration,
    pub(super) first_token: Option<Instant>,
    /// When the last chunk reached the client (inter-token latency).
    pub(super) last_token: Option<Instant>,
    /// Pool, id and price of the worker running the current segment.
    pub(super) pool: Pool,
    pub(super) worker: String,
    pub(super) cost_per_mtok: f64,
    pub(super) span: tracing::Span,
    /// Next client chunk sequence number.
    pub(super) seq: u64,
    /// Token ids and text of the current segment already sent to the client.
    pub(super) segment_ids: Vec<u32>,
    pub(super) segment_text: String,
    /// The calls of tools the current segment sent to the client, put together.
    pub(super) segment_calls: Vec<v1::ToolCall>,
    /// Tokens sent to the client across all segments.
    pub(super) delivered: u32,
    /// Tokens the last segment's worker made beyond the pieces it sent: a gateway passes on
    /// an upstream chunk of several tokens (a character spelt by two byte tokens) as one.
    pub(super) unsent_tokens: u32,
    pub(super) prompt_tokens: u32,
    /// Prompt tokens the worker reused from its prefix cache (from its `Finished` usage).
    pub(super) cached_prompt_tokens: u32,
    /// Prompt tokens placement expected the current worker to reuse.
    pub(super) predicted_cached_tokens: u32,
    /// The policy's TTFT prediction for the first worker (from placement).
    pub(super) predicted_ttft_ms: f64,
    /// The alternatives to the first worker, for the ledger.
    pub(super) alternatives: ledger::Basis,
    pub(super) attempts: u32,
    pub(super) cancelled: bool,
    /// Listed with the placement task while the policy may move it (see [`ListedRun`]).
    pub(super) listing: Option<Listing>,
    /// Where the placement task ordered it to move, its slot held there (set when the segment
    /// it was ordered off ends as moved).
    move_target: Option<Chosen>,
    /// Tokens generated so far, as the placement task sees them.
    pub(super) generated: Arc<AtomicU32>,
    /// Its pace on the worker it is listed on (rebalancing).
    pace: Option<Arc<Pace>>,
    /// Times it moved on the router's order.
    pub(super) moves: u32,
    /// Those moves, for the outcome report.
    pub(super) moved: Vec<v1::MoveRecord>,
    /// The token series of the current worker's pool (set by [`Run::on_worker`]).
    pub(super) stream_metrics: Option<StreamMetrics>,
    /// See [`Held`]: given back before the last frame.
    pub(super) held: Held,
    /// A second worker to race the first segment on (the policy's `hedging`).
    hedge: Option<Hedge>,
    /// The first placement's reason label (`home`, `borrow_wse`, …).
    placement_label: &'static str,
    /// An embedding request's vector, from its worker's `Finished`.
    pub(super) embedding: Vec<f32>,
}

/// A generation started on a worker. Dropping it stops routing its frames and, unless the
/// worker is known to have ended it, asks the worker to cancel it: however the dispatcher
/// leaves a segment (the client went away mid-forward, its task was dropped), nothing keeps
/// generating for nobody. The cancel follows the `Start` on the same ordered stream, so it
/// reaches the worker even while the start is still in flight.
struct Generation {
    link: Arc<Link>,
    id: String,
    /// The worker finished or failed it, or its stream was lost.
    ended: bool,
    /// The link still routes its frames here. A link forgets a generation by itself when it
    /// passes on its last frame or loses its stream: telling it again would cost a command
    /// (and a wake-up of the link's task) per request.
    routed: bool,
}

impl Generation {
    /// The link passed on its end (finished, failed, or stream lost): the worker is done with
    /// it and the link has forgotten it.
    fn ended_by_link(&mut self) {
        self.ended = true;
        self.routed = false;
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.ended {
            self.link.cancel(&self.id, v1::FinishReason::Cancelled);
        }
        if self.routed {
            self.link.forget(&self.id);
        }
    }
}

/// A generation started on a worker whose events the run has yet to follow.
struct Started {
    generation: Generation,
    events: LinkEvents,
    /// An event already read from `events` (by a hedge race), handled first.
    first: Option<LinkEvent>,
    /// A client control that arrived during a hedge race, handled first.
    control: Option<Control>,
}

impl Started {
    fn new(link: &Arc<Link>, id: String, events: LinkEvents) -> Self {
        Self {
            generation: Generation {
                link: link.clone(),
                id,
                ended: false,
                routed: true,
            },
            events,
            first: None,
            control: None,
        }
    }
}

/// The next event of a racing copy; never, for a copy out of the race.
async fn next_event(copy: Option<&mut Started>) -> Option<LinkEvent> {
    match copy {
        Some(copy) => copy.events.recv().await,
        None => std::future::pending().await,
    }
}

/// How a hedge race ended for one copy (see [`Run::race`]).
enum RaceEvent {
    /// A token, or its end: this copy is the one the client gets.
    Won(LinkEvent),
    /// Nothing the race cares about (load reports).
    Quiet,
    /// It failed or its worker was lost before a token: the other copy goes on if it can.
    Out(LinkEvent),
}

impl RaceEvent {
    fn of(event: Option<LinkEvent>) -> Self {
        match event {
            Some(event @ LinkEvent::Frame(worker_frame::Frame::Tokens(_)))
            | Some(event @ LinkEvent::Frame(worker_frame::Frame::Finished(_))) => {
                RaceEvent::Won(event)
            }
            Some(LinkEvent::Frame(
                worker_frame::Frame::Load(_) | worker_frame::Frame::KvEvents(_),
            )) => RaceEvent::Quiet,
            Some(event) => RaceEvent::Out(event),
            None => RaceEvent::Out(LinkEvent::Lost("link closed".into())),
        }
    }
}

/// What ended a segment.
#[derive(Debug)]
enum SegmentEnd {
    Finished(v1::Finished),
    Interrupted(v1::Interrupt),
    /// Stopped on the router's order, to go on elsewhere.
    Moved(MoveReason),
    Lost(String),
    Failed(v1::Failed),
}

/// What a request does after one of its segments ended (see [`after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// End the request with this `FinishReason`.
    Finish(i32),
    /// Continue with the interrupt's new instructions, on the same worker when it is still
    /// available.
    Redirect { same_worker: bool },
    /// Resume on another worker; `full` when the worker refused for lack of room (overload:
    /// shed if no other worker can take it).
    Failover { full: bool },
    /// Resume on another worker, on the router's order (its tokens so far kept).
    Move,
    /// End the request with the worker's error.
    Fail,
}

/// The run's decision after segment `end`: pure, so every path is unit-tested. A cancel wins
/// over everything (the segment already ended as cancelled); an interrupt whose token budget
/// is spent finishes; a lost worker or one refusing with `UNAVAILABLE` / `RESOURCE_EXHAUSTED`
/// is failed over; any other refusal is the request's error.
fn after(
    end: &SegmentEnd,
    cancelled: bool,
    delivered: u32,
    max_tokens: u32,
    worker_available: bool,
) -> Next {
    match end {
        _ if cancelled => Next::Finish(v1::FinishReason::Cancelled as i32),
        SegmentEnd::Finished(finished) => Next::Finish(finished.reason),
        // The budget ran out before the redirect could take effect.
        SegmentEnd::Interrupted(_) if delivered >= max_tokens => {
            Next::Finish(v1::FinishReason::Length as i32)
        }
        SegmentEnd::Interrupted(_) => Next::Redirect {
            same_worker: worker_available,
        },
        SegmentEnd::Moved(_) => Next::Move,
        SegmentEnd::Lost(_) => Next::Failover { full: false },
        SegmentEnd::Failed(failed) => match Code::from_i32(failed.code) {
            Code::Unavailable => Next::Failover { full: false },
            Code::ResourceExhausted => Next::Failover { full: true },
            _ => Next::Fail,
        },
    }
}

/// What a worker's `Finished` ends a segment as, given what the run asked of it: an interrupt
/// or a move it asked for (unless the client cancelled since), or the finish itself — except a
/// `CANCELLED` nobody here asked for, which means the worker dropped the generation (a worker
/// from before workers said so with a `Failed`, stopping past its drain timeout): lost, and
/// the client still gets the rest.
fn segment_finished(
    finished: v1::Finished,
    interrupt: Option<v1::Interrupt>,
    moving: Option<MoveReason>,
    cancelled: bool,
    worker: impl FnOnce() -> String,
) -> SegmentEnd {
    // A generation that reached its end before the stop took effect simply finished.
    let stopped = finished.reason == v1::FinishReason::Interrupted as i32;
    let unasked = finished.reason == v1::FinishReason::Cancelled as i32;
    match (interrupt, moving) {
        (Some(i), _) if !cancelled => SegmentEnd::Interrupted(i),
        (None, Some(reason)) if !cancelled && stopped => SegmentEnd::Moved(reason),
        (None, None) if !cancelled && unasked => SegmentEnd::Lost(format!(
            "worker {} stopped the generation unasked",
            worker()
        )),
        _ => SegmentEnd::Finished(finished),
    }
}

/// Tokens of a reply a run makes room for when it starts (at most `max_tokens`).
const REPLY_TOKENS_RESERVED: u32 = 256;
/// Text bytes a token usually decodes to (English text and code, ~4 characters a token).
const BYTES_PER_TOKEN: usize = 4;

impl<'d> Run<'d> {
    pub(super) fn new(
        request: v1::GenerateRequest,
        prompt_ids: Vec<u32>,
        class: Classification,
        arrived: Instant,
        chosen: Chosen,
        span: tracing::Span,
        dispatcher: &'d Dispatcher,
    ) -> Self {
        let placement_reason = &chosen.reason;
        span.record("predicted_cached_tokens", chosen.cached_tokens);
        let (label, link) = (chosen.reason_label, chosen.link.clone());
        // Room for a usual reply up front: grown chunk by chunk (a paced stream's chunks carry
        // one token each), the segment's ids and text were reallocated ~10 times a request.
        let reply_tokens = request
            .sampling
            .as_ref()
            .map_or(0, |s| s.max_tokens)
            .min(REPLY_TOKENS_RESERVED) as usize;
        let mut run = Self {
            slot: Some(chosen.slot),
            prompt_ids,
            predicted_cached_tokens: chosen.cached_tokens,
            predicted_ttft_ms: chosen.predicted_ttft_ms,
            alternatives: chosen.alternatives,
            last_token: None,
            pool: Pool::Gpu,
            worker: String::new(),
            cost_per_mtok: 0.0,
            span,
            dispatcher,
            lane: class.wire_lane(),
            reason: format!("{}; {placement_reason}", class.reason),
            class,
            request,
            arrived,
            placed: Instant::now(),
            waited: Duration::ZERO,
            first_token: None,
            seq: 0,
            segment_ids: Vec::with_capacity(reply_tokens),
            segment_text: String::with_capacity(reply_tokens * BYTES_PER_TOKEN),
            segment_calls: Vec::new(),
            delivered: 0,
            unsent_tokens: 0,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            attempts: 1,
            cancelled: false,
            held: Held::default(),
            stream_metrics: None,
            listing: None,
            move_target: None,
            generated: Arc::default(),
            moves: 0,
            hedge: chosen.hedge,
            placement_label: label,
            embedding: Vec::new(),
            pace: None,
            moved: Vec::new(),
        };
        // A hedged request is listed where its race's winner runs.
        if run.hedge.is_none() {
            run.list(label, &link);
        }
        run
    }

    /// Gives back what the request held, charging its tenant the prompt and the tokens
    /// delivered (see [`Held`]).
    pub(super) fn release(&mut self) {
        self.held.release(Some(
            u64::from(self.prompt_tokens) + u64::from(self.delivered),
        ));
    }

    pub(super) async fn drive(
        &mut self,
        mut link: Arc<Link>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Result<(), DispatchError> {
        // A hedged request is accepted by the copy that wins its race. (Races and moves are
        // rare and their futures large: boxed, they do not make every request's future larger.)
        let mut started = None;
        if let Some(hedge) = self.hedge.take() {
            let (winner, first) = Box::pin(self.race(link, hedge, controls, out)).await?;
            link = winner;
            self.list(self.placement_label, &link);
            started = Some(first);
        }
        let record = link.record();
        let accepted = Frame::Accepted(v1::Accepted {
            request_id: self.request.request_id.clone(),
            lane: self.lane as i32,
            pool: record.pool.to_string(),
            worker_id: record.id.clone(),
            model: self.request.model.clone(),
            reason: self.reason.clone(),
        });
        send(out, accepted).await?;
        record_decision(
            &Span::current(),
            self.class.lane.as_str(),
            record.pool.as_str(),
            &record.id,
            &self.reason,
        );
        // The request span carries the request id, lane, pool, worker and reason.
        info!("accepted");

        let mut excluded = Vec::new();
        loop {
            let end = match started.take() {
                Some(Ok(first)) => self.follow(&link, first, controls, out).await?,
                Some(Err(why)) => SegmentEnd::Lost(why),
                None => self.segment(&link, controls, out).await?,
            };
            let next = after(
                &end,
                self.cancelled,
                self.delivered,
                self.max_tokens(),
                link.state().available,
            );
            match (next, end) {
                (Next::Finish(reason), SegmentEnd::Finished(finished)) => {
                    if let Some(usage) = finished.usage {
                        self.prompt_tokens = usage.prompt_tokens;
                        self.cached_prompt_tokens = usage.cached_prompt_tokens;
                        // The worker's count covers the segment, the tokens it resumed after
                        // included.
                        self.unsent_tokens = usage
                            .completion_tokens
                            .saturating_sub(self.segment_ids.len() as u32);
                    }
                    self.span.record("cached_tokens", self.cached_prompt_tokens);
                    self.embedding = finished.embedding;
                    self.dispatcher.metrics.prefix_reuse(
                        self.pool,
                        self.predicted_cached_tokens,
                        self.cached_prompt_tokens,
                    );
                    return self.finish(reason, finished.stop_sequence, out).await;
                }
                (Next::Finish(reason), _) => return self.finish(reason, String::new(), out).await,
                (Next::Redirect { same_worker }, SegmentEnd::Interrupted(interrupt)) => {
                    self.redirect(interrupt).await;
                    // The same worker when it can: its KV cache holds this conversation.
                    if !same_worker {
                        link = self.replace(&link, &mut excluded)?;
                    }
                }
                (Next::Move, SegmentEnd::Moved(reason)) => {
                    link = Box::pin(self.move_on(&link, reason, out)).await?;
                }
                (Next::Failover { full }, end) => {
                    let why = match &end {
                        SegmentEnd::Lost(why) => why.clone(),
                        SegmentEnd::Failed(failed) => failed.message.clone(),
                        _ => String::new(),
                    };
                    if matches!(end, SegmentEnd::Lost(_)) {
                        warn!(request_id = %self.request.request_id, worker = %link.id(), %why, delivered = self.segment_ids.len(), "worker lost mid-request; failing over");
                    } else {
                        debug!(request_id = %self.request.request_id, worker = %link.id(), message = %why, "worker refused; placing elsewhere");
                    }
                    self.dispatcher.metrics.failover(self.class.lane, self.pool);
                    link = match self.replace(&link, &mut excluded) {
                        Ok(next) => next,
                        // A full worker and nowhere else to go is overload, not an outage:
                        // the client is told when to retry, as if shed at the door.
                        Err(error) if full && error.code() == Code::Unavailable => {
                            self.dispatcher.metrics.shed(self.class.lane);
                            let policy = self.dispatcher.policy.current();
                            return Err(DispatchError::Shed {
                                message: format!(
                                    "every worker serving {:?} is full ({why}); request shed",
                                    self.request.model
                                ),
                                retry_after_ms: policy.lane(self.class.lane).retry_after_ms,
                            });
                        }
                        Err(error) => return Err(error),
                    };
                }
                (_, SegmentEnd::Failed(failed)) => return Err(DispatchError::from_worker(failed)),
                (next, end) => unreachable!("after() paired {next:?} with {end:?}"),
            }
        }
    }

    /// Lists the run with the placement task while the policy may move generations (its
    /// `migration`): a cost-sensitive one that borrowed a wafer-scale slot (`label`) may have
    /// to give it back, any may be handed off a draining worker.
    fn list(&mut self, label: &str, link: &Link) {
        let policy = self.dispatcher.policy.current();
        let migration = &policy.migration;
        // A generation scoring or embedding its prompt stays where it is: a move's target need
        // not be able to (such requests are one token long anyway).
        let special = super::place::Needs::of(&self.request) != super::place::Needs::Generation;
        let movable = migration.enabled
            && !special
            && self.moves < migration.max_moves_per_generation
            && ((migration.preempt_borrowed_wse && label == "borrow_wse")
                || migration.drain_handoff
                || migration.rebalance);
        self.pace = movable.then(|| Arc::new(Pace::new()));
        self.listing = self.pace.clone().map(|pace| {
            self.dispatcher.placer.list(ListedRun {
                worker: link.id(),
                model: self.request.model.clone(),
                class: self.class.clone(),
                prompt_tokens: token_count(&self.prompt_ids),
                generated: self.generated.clone(),
                max_tokens: self.max_tokens(),
                moves: self.moves,
                arrived: self.arrived,
                predicted_ttft_ms: self.predicted_ttft_ms,
                pace,
            })
        });
    }

    /// Moves the request off `from` on the router's order, to the target the order holds a
    /// slot on: it resumes there after the tokens the client has, and the client is told.
    async fn move_on(
        &mut self,
        from: &Arc<Link>,
        reason: MoveReason,
        out: &FrameSink,
    ) -> Result<Arc<Link>, DispatchError> {
        let Some(chosen) = self.move_target.take() else {
            // Not reached: a segment ends as moved only on an order, which carries its target.
            warn!(request_id = %self.request.request_id, worker = %from.id(), "moved without a target; resuming where it was");
            return Ok(from.clone());
        };
        self.moves += 1;
        self.slot = Some(chosen.slot);
        self.predicted_cached_tokens = chosen.cached_tokens;
        let (old, new) = (from.record(), chosen.link.record());
        self.moved.push(v1::MoveRecord {
            from_worker_id: old.id.clone(),
            from_pool: old.pool.to_string(),
            to_worker_id: new.id.clone(),
            to_pool: new.pool.to_string(),
            reason: reason.as_str().into(),
            at_token: self.delivered,
            at_unix_ms: crate::report::now_unix_ms(),
        });
        self.dispatcher
            .metrics
            .moved(reason.as_str(), old.pool, new.pool);
        record_decision(
            &Span::current(),
            self.class.lane.as_str(),
            new.pool.as_str(),
            &new.id,
            &format!(
                "{}; moved ({}): {}",
                self.class.reason,
                reason.as_str(),
                chosen.reason
            ),
        );
        send(
            out,
            Frame::Moved(v1::Moved {
                request_id: self.request.request_id.clone(),
                from_worker_id: old.id.clone(),
                from_pool: old.pool.to_string(),
                to_worker_id: new.id.clone(),
                to_pool: new.pool.to_string(),
                reason: reason.as_str().into(),
            }),
        )
        .await?;
        self.list(chosen.reason_label, &chosen.link);
        Ok(chosen.link)
    }

    /// Picks another worker after `failed` could not serve the request.
    fn replace(
        &mut self,
        failed: &Arc<Link>,
        excluded: &mut Vec<String>,
    ) -> Result<Arc<Link>, DispatchError> {
        self.attempts += 1;
        if self.attempts > self.dispatcher.config.max_attempts {
            return Err(DispatchError::Unavailable(format!(
                "gave up after {} attempts; last worker {} failed",
                self.dispatcher.config.max_attempts,
                failed.id()
            )));
        }
        excluded.push(failed.id());
        // Once the client has a token it has the scored prompt: any worker may go on.
        let needs = match self.delivered {
            0 => super::place::Needs::of(&self.request),
            _ => super::place::Needs::Generation,
        };
        let Chosen {
            link,
            reason,
            reason_label,
            cached_tokens,
            slot,
            ..
        } = self.dispatcher.replace(
            &self.request,
            &self.prompt_ids,
            &self.class,
            excluded.clone(),
            needs,
        )?;
        // Listed where it runs now: moves are judged against the worker it is on.
        self.list(reason_label, &link);
        self.slot = Some(slot);
        self.predicted_cached_tokens = cached_tokens;
        self.span.record("predicted_cached_tokens", cached_tokens);
        debug!(request_id = %self.request.request_id, worker = %link.id(), %reason, "replacement placed");
        // The span names the worker that finishes the request.
        let record = link.record();
        record_decision(
            &Span::current(),
            self.class.lane.as_str(),
            record.pool.as_str(),
            &record.id,
            &format!("{}; failover: {reason}", self.class.reason),
        );
        Ok(link)
    }

    /// Notes the worker now running the request (metrics labels, span fields, report).
    pub(super) fn on_worker(&mut self, record: &switchyard_cluster::WorkerRecord) {
        if self.stream_metrics.is_some() && self.worker == record.id {
            // Noted already (a request's first segment is noted as it is placed).
            return;
        }
        self.pool = record.pool;
        self.worker.clone_from(&record.id);
        self.cost_per_mtok = record.capacity.cost_per_mtok;
        self.span.record("pool", pool_label(Some(record.pool)));
        self.span.record("worker", record.id.as_str());
        self.stream_metrics = Some(self.dispatcher.metrics.stream(&StreamLabels {
            lane: lane_label(self.class.lane),
            pool: pool_label(Some(record.pool)),
            model: self.request.model.clone(),
        }));
    }

    /// Runs one generation on `link` until it ends one way or another.
    async fn segment(
        &mut self,
        link: &Arc<Link>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Result<SegmentEnd, DispatchError> {
        let record = link.record();
        self.on_worker(&record);
        if out.is_closed() {
            // The client left before anything started: start nothing.
            return Err(DispatchError::ClientGone);
        }
        let generation_id = self.dispatcher.links.next_generation_id();
        let started = tokio::select! {
            started = link.start(self.worker_start(&generation_id)) => started,
            // The worker is taking starts more slowly than they come: nothing was sent yet.
            _ = out.closed() => return Err(DispatchError::ClientGone),
        };
        if let Some(slot) = self.slot.take() {
            slot.release_after_start();
        }
        match started {
            Ok(events) => {
                self.follow(
                    link,
                    Started::new(link, generation_id, events),
                    controls,
                    out,
                )
                .await
            }
            Err(why) => Ok(SegmentEnd::Lost(why)),
        }
    }

    /// Starts the request on its worker and on the hedge's, and keeps the copy that produces
    /// a token (or ends) first; the other is cancelled as it drops. A copy that fails or is
    /// lost before a token leaves the other to go on. A client control or departure ends the
    /// race at once (the control goes to the primary copy). Returns the copy that goes on, as
    /// its link and generation, or why neither could start.
    async fn race(
        &mut self,
        primary: Arc<Link>,
        mut hedge: Hedge,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Result<(Arc<Link>, Result<Started, String>), DispatchError> {
        if out.is_closed() {
            // Nothing started, nothing wasted.
            hedge.charge.unused();
            return Err(DispatchError::ClientGone);
        }
        let links = &self.dispatcher.links;
        let (first_id, second_id) = (links.next_generation_id(), links.next_generation_id());
        let (first_start, second_start) =
            (self.worker_start(&first_id), self.worker_start(&second_id));
        let (first, second) = tokio::select! {
            started = async {
                tokio::join!(primary.start(first_start), hedge.link.start(second_start))
            } => started,
            _ = out.closed() => return Err(DispatchError::ClientGone),
        };
        if let Some(slot) = self.slot.take() {
            slot.release_after_start();
        }
        hedge.slot.release_after_start();
        let lane = self.class.lane;
        let metrics = &self.dispatcher.metrics;
        let (mut first, mut second) = match (first, second) {
            (Ok(first), Ok(second)) => (
                Some(Started::new(&primary, first_id, first)),
                Some(Started::new(&hedge.link, second_id, second)),
            ),
            (first, second) => {
                // One copy at most: no race, nothing wasted.
                hedge.charge.unused();
                return Ok(match (first, second) {
                    (Err(_), Ok(second)) => {
                        metrics.hedged(lane, "hedge");
                        let started = Started::new(&hedge.link, second_id, second);
                        (hedge.link.clone(), Ok(started))
                    }
                    (first, _) => {
                        metrics.hedged(lane, "primary");
                        (
                            primary.clone(),
                            first.map(|f| Started::new(&primary, first_id, f)),
                        )
                    }
                });
            }
        };
        let mut control = None;
        let mut controls_open = true;
        let winner_is_first = loop {
            let (is_first, event) = tokio::select! {
                event = next_event(first.as_mut()) => (true, RaceEvent::of(event)),
                event = next_event(second.as_mut()) => (false, RaceEvent::of(event)),
                next = controls.recv(), if controls_open => match next {
                    Some(next) => {
                        control = Some(next);
                        break first.is_some();
                    }
                    None => {
                        controls_open = false;
                        continue;
                    }
                },
                _ = out.closed() => return Err(DispatchError::ClientGone),
            };
            let (this, other) = if is_first {
                (&mut first, &second)
            } else {
                (&mut second, &first)
            };
            match event {
                RaceEvent::Quiet => {}
                RaceEvent::Won(event) => {
                    this.as_mut().expect("raced").first = Some(event);
                    break is_first;
                }
                RaceEvent::Out(event) if other.is_some() => {
                    debug!(request_id = %self.request.request_id, ?event, "a hedged copy failed before its first token; the other goes on");
                    // Already ended on the worker's side (failed or lost).
                    if let Some(mut gone) = this.take() {
                        gone.generation.ended_by_link();
                    }
                }
                RaceEvent::Out(event) => {
                    // The last copy standing: its failure is the run's to handle.
                    this.as_mut().expect("raced").first = Some(event);
                    break is_first;
                }
            }
        };
        let (winner, link, name) = if winner_is_first {
            (first, primary, "primary")
        } else {
            (second, hedge.link.clone(), "hedge")
        };
        let mut winner = winner.expect("the winner is still running");
        winner.control = control;
        metrics.hedged(lane, name);
        self.reason = format!("{}; the {name} won the race", self.reason);
        self.on_worker(&link.record());
        // After on_worker: the span names the winning worker.
        info!(winner = name, "hedge race decided");
        // The loser drops here, which cancels it; the charge settles as it drops.
        Ok((link, Ok(winner)))
    }

    /// Follows a started generation on `link` until it ends one way or another.
    async fn follow(
        &mut self,
        link: &Arc<Link>,
        started: Started,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Result<SegmentEnd, DispatchError> {
        let Started {
            // From here every way out of this function — including an early return because
            // the client went away while a frame was being forwarded — stops the generation
            // unless the worker said it ended.
            mut generation,
            mut events,
            first,
            control,
        } = started;
        let generation_id = generation.id.clone();
        let mut controls_open = true;
        let mut interrupt: Option<v1::Interrupt> = None;
        let mut cancel_deadline: Option<Instant> = None;
        // Tokens the client has taken since the last grant, returned in batches of half the
        // window (as HTTP/2 returns its window) so credit costs a frame per many chunks.
        let window = self.dispatcher.config.stream_credit_tokens;
        let mut to_grant = 0u32;
        // An event read while merging chunks (or by a hedge race), handled next.
        let mut held_back: Option<LinkEvent> = first;
        // A control read by a hedge race, handled next.
        let mut held_control = control;
        // The run's listing with the placement task, while it may be moved.
        let mut listing = self.listing.take();
        let mut moving: Option<MoveOrder> = None;
        // One wait for the client's departure for the whole segment: made afresh for every
        // chunk, it joined and left the waiters of the channel all of a session's requests
        // share, under its lock, twice a chunk.
        let client_gone = out.closed();
        tokio::pin!(client_gone);
        let end = loop {
            let grace = async {
                match cancel_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next_event = async {
                match held_back.take() {
                    Some(event) => Some(event),
                    None => events.recv().await,
                }
            };
            tokio::select! {
                event = next_event => match event {
                    Some(LinkEvent::Frame(worker_frame::Frame::Tokens(mut tokens))) => {
                        // Chunks the worker already sent go to the client as one frame: a
                        // client (or router) that fell behind catches up in fewer frames, and
                        // one that keeps up gets each chunk as it comes.
                        while let Ok(more) = events.try_recv() {
                            match more {
                                LinkEvent::Frame(worker_frame::Frame::Tokens(more)) => {
                                    tokens.append(more);
                                }
                                other => {
                                    held_back = Some(other);
                                    break;
                                }
                            }
                        }
                        let count = tokens.token_ids.len() as u32;
                        self.forward(tokens, out).await?;
                        to_grant += count;
                        if window > 0 && to_grant >= window.div_ceil(2) {
                            link.grant(&generation_id, std::mem::take(&mut to_grant));
                        }
                    }
                    Some(LinkEvent::Frame(worker_frame::Frame::Finished(finished))) => {
                        generation.ended_by_link();
                        break segment_finished(
                            finished,
                            interrupt.take(),
                            moving.as_ref().map(|order| order.reason),
                            self.cancelled,
                            || link.id(),
                        );
                    }
                    Some(LinkEvent::Frame(worker_frame::Frame::Failed(failed))) => {
                        generation.ended_by_link();
                        break SegmentEnd::Failed(failed);
                    }
                    Some(LinkEvent::Frame(
                        worker_frame::Frame::Load(_) | worker_frame::Frame::KvEvents(_),
                    )) => {}
                    Some(LinkEvent::Lost(why)) => {
                        // The worker's stream is gone, and with it (on the worker's side)
                        // the generation.
                        generation.ended_by_link();
                        break SegmentEnd::Lost(why);
                    }
                    None => break SegmentEnd::Lost("link closed".into()),
                },
                order = async {
                    match listing.as_mut() {
                        Some(listed) => (&mut listed.order).await.ok(),
                        None => std::future::pending().await,
                    }
                }, if listing.is_some() => {
                    // Off the list either way: ordered once, or the placement task is gone.
                    listing = None;
                    if let Some(order) = order
                        && moving.is_none()
                        && interrupt.is_none()
                        && !self.cancelled
                    {
                        info!(move_reason = order.reason.as_str(), to = %order.target.link.id(), "moving to another worker");
                        link.cancel(&generation_id, v1::FinishReason::Interrupted);
                        moving = Some(order);
                    }
                }
                control = async {
                    match held_control.take() {
                        Some(control) => Some(control),
                        None => controls.recv().await,
                    }
                }, if controls_open || held_control.is_some() => match control {
                    Some(Control::Cancel) => {
                        self.cancelled = true;
                        link.cancel(&generation_id, v1::FinishReason::Cancelled);
                        cancel_deadline.get_or_insert(Instant::now() + self.dispatcher.config.cancel_grace);
                    }
                    Some(Control::Interrupt(i)) => {
                        link.cancel(&generation_id, v1::FinishReason::Interrupted);
                        interrupt = Some(*i);
                    }
                    None => controls_open = false,
                },
                () = &mut client_gone => {
                    debug!(request_id = %self.request.request_id, "client went away; cancelling");
                    // `generation` sends the cancel as it drops.
                    return Err(DispatchError::ClientGone);
                }
                _ = grace => {
                    warn!(request_id = %self.request.request_id, worker = %link.id(), "worker did not confirm the cancel in time");
                    // Already cancelled: just stop listening.
                    generation.ended = true;
                    break SegmentEnd::Finished(v1::Finished::default());
                }
            }
        };
        // Still where it was listed (it ended, or is redirected there): still listed.
        self.listing = listing;
        if matches!(end, SegmentEnd::Moved(_)) {
            self.move_target = moving.map(|order| order.target);
        }
        if self.cancelled {
            // A cancel wins over whatever else ended the segment: no failover, no redirect.
            return Ok(match end {
                SegmentEnd::Finished(f) => SegmentEnd::Finished(f),
                _ => SegmentEnd::Finished(v1::Finished::default()),
            });
        }
        Ok(end)
    }

    /// The request's completion tokens, as its usage reports them: every token made, whether
    /// or not it reached the client as a piece of its own.
    pub(super) fn completion_tokens(&self) -> u32 {
        self.delivered + self.unsent_tokens
    }

    fn max_tokens(&self) -> u32 {
        self.request
            .sampling
            .as_ref()
            .map(|s| s.max_tokens)
            .unwrap_or_default()
    }

    fn worker_start(&self, generation_id: &str) -> v1::WorkerStart {
        let mut sampling = self.request.sampling.clone().unwrap_or_default();
        // Tokens of earlier segments (before an interrupt) count against max_tokens.
        let earlier = self.delivered - self.segment_ids.len() as u32;
        sampling.max_tokens = sampling.max_tokens.saturating_sub(earlier).max(1);
        // The client has the scored prompt once it has a token: a segment resuming after a
        // failover, a move or an interrupt scores nothing again.
        sampling.prompt_logprobs &= self.delivered == 0;
        v1::WorkerStart {
            request_id: generation_id.to_string(),
            model: self.request.model.clone(),
            messages: self.request.messages.clone(),
            prompt: self.request.prompt.clone(),
            sampling: Some(sampling),
            resume_tokens: self.segment_ids.clone(),
            trace_context: propagation::span_to_map(&self.span),
            lane: self.lane as i32,
            prompt_token_ids: self.prompt_ids.clone(),
            credit_tokens: self.dispatcher.config.stream_credit_tokens,
            min_tokens_per_s: self.class.min_tokens_per_s,
            client_request_id: self.request.request_id.clone(),
            tools: self.request.tools.clone(),
            tool_choice: self.request.tool_choice.clone(),
            embed: self.request.embed,
        }
    }

    async fn forward(&mut self, tokens: v1::Tokens, out: &FrameSink) -> Result<(), DispatchError> {
        if tokens.token_ids.is_empty()
            && tokens.text.is_empty()
            && tokens.tool_calls.is_empty()
            && tokens.prompt_logprobs.is_empty()
        {
            return Ok(());
        }
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        let (gap, first) = match self.last_token.replace(now) {
            Some(previous) => (now - previous, false),
            None => (now - self.arrived, true),
        };
        if let Some(metrics) = &self.stream_metrics {
            metrics.tokens(tokens.token_ids.len() as u32, gap, first);
        }
        self.delivered += tokens.token_ids.len() as u32;
        if let Some(pace) = &self.pace {
            pace.tokens(tokens.token_ids.len() as u32);
        }
        self.generated
            .fetch_add(tokens.token_ids.len() as u32, Ordering::Relaxed);
        self.dispatcher
            .reports
            .tokens(self.pool, tokens.token_ids.len() as u32);
        self.segment_ids.extend_from_slice(&tokens.token_ids);
        self.segment_text.push_str(&tokens.text);
        switchyard_proto::assemble_tool_calls(&mut self.segment_calls, &tokens.tool_calls);
        let frame = Frame::Tokens(v1::Tokens {
            request_id: self.request.request_id.clone(),
            seq: self.seq,
            text: tokens.text,
            token_ids: tokens.token_ids,
            logprobs: tokens.logprobs,
            tool_calls: tokens.tool_calls,
            prompt_logprobs: tokens.prompt_logprobs,
        });
        self.seq += 1;
        send(out, frame).await
    }

    /// Rewrites the conversation for an interrupt: the generated text and calls (if kept)
    /// become an assistant turn, then the new messages follow; the next segment starts fresh.
    async fn redirect(&mut self, interrupt: v1::Interrupt) {
        let generated = Generated {
            text: std::mem::take(&mut self.segment_text),
            calls: std::mem::take(&mut self.segment_calls),
        };
        let keep_generated = interrupt.keep_generated;
        apply_interrupt(&mut self.request, generated, interrupt);
        self.prompt_ids = self
            .dispatcher
            .links
            .tokenizers()
            .tokenize_off_runtime(&self.request)
            .await
            .unwrap_or_default();
        self.segment_ids.clear();
        info!(
            keep_generated,
            "interrupted; continuing with new instructions"
        );
    }
}

/// What a segment sent the client before an interrupt.
#[derive(Default)]
pub(super) struct Generated {
    pub text: String,
    pub calls: Vec<v1::ToolCall>,
}

/// Rewrites `request`'s conversation for an interrupt: what was `generated` (if kept) becomes
/// an assistant turn, then the new messages follow. Of the calls, those whose arguments were
/// written whole are kept: a call cut off mid-arguments was never made.
pub(super) fn apply_interrupt(
    request: &mut v1::GenerateRequest,
    generated: Generated,
    interrupt: v1::Interrupt,
) {
    if request.messages.is_empty() {
        let prompt = std::mem::take(&mut request.prompt);
        request.messages.push(v1::ChatMessage {
            role: "user".into(),
            content: prompt,
            ..Default::default()
        });
    }
    let calls: Vec<v1::ToolCall> = generated
        .calls
        .into_iter()
        .filter(|call| {
            serde_json::from_str::<serde_json::Value>(&call.arguments).is_ok_and(|a| a.is_object())
        })
        .collect();
    if interrupt.keep_generated && !(generated.text.is_empty() && calls.is_empty()) {
        request.messages.push(v1::ChatMessage {
            role: "assistant".into(),
            content: generated.text,
            tool_calls: calls,
            ..Default::default()
        });
    }
    request.messages.extend(interrupt.messages);
}

pub(super) async fn send(out: &FrameSink, frame: Frame) -> Result<(), DispatchError> {
    out.send(Ok(v1::ServerFrame { frame: Some(frame) }))
        .await
        .map_err(|_| DispatchError::ClientGone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_generation_keeps_its_whole_calls_only() {
        let call = |id: &str, arguments: &str| v1::ToolCall {
            id: id.into(),
            name: "f".into(),
            arguments: arguments.into(),
        };
        let mut request = v1::GenerateRequest {
            prompt: "ask".into(),
            ..Default::default()
        };
        let generated = Generated {
            text: String::new(),
            calls: vec![call("whole", r#"{"a":1}"#), call("cut", r#"{"a":"#)],
        };
        let interrupt = v1::Interrupt {
            keep_generated: true,
            ..Default::default()
        };
        apply_interrupt(&mut request, generated, interrupt);
        let roles: Vec<&str> = request.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant"]);
        assert_eq!(
            request.messages[1].tool_calls,
            [call("whole", r#"{"a":1}"#)]
        );

        // Nothing whole generated: no empty assistant turn.
        let mut request = v1::GenerateRequest {
            prompt: "ask".into(),
            ..Default::default()
        };
        let generated = Generated {
            text: String::new(),
            calls: vec![call("cut", "{")],
        };
        let interrupt = v1::Interrupt {
            keep_generated: true,
            ..Default::default()
        };
        apply_interrupt(&mut request, generated, interrupt);
        assert_eq!(request.messages.len(), 1, "{:?}", request.messages);
    }

    #[test]
    fn a_finish_ends_the_segment_as_what_the_run_asked_for() {
        use v1::FinishReason::{Cancelled, Interrupted, Length};
        let finished = |reason: v1::FinishReason| v1::Finished {
            reason: reason as i32,
            ..Default::default()
        };
        let kind = |end: SegmentEnd| match end {
            SegmentEnd::Finished(f) => format!("finished {}", f.reason),
            SegmentEnd::Interrupted(_) => "interrupted".into(),
            SegmentEnd::Moved(_) => "moved".into(),
            SegmentEnd::Lost(_) => "lost".into(),
            SegmentEnd::Failed(_) => "failed".into(),
        };
        let end = |reason, interrupt: bool, moving: bool, cancelled| {
            kind(segment_finished(
                finished(reason),
                interrupt.then(v1::Interrupt::default),
                moving.then_some(MoveReason::Preempt),
                cancelled,
                || "w".to_string(),
            ))
        };
        let (length, cancelled) = (Length as i32, Cancelled as i32);
        assert_eq!(
            end(Length, false, false, false),
            format!("finished {length}")
        );
        assert_eq!(end(Interrupted, true, false, false), "interrupted");
        assert_eq!(end(Interrupted, false, true, false), "moved");
        // Reached its end before the move took effect.
        assert_eq!(
            end(Length, false, true, false),
            format!("finished {length}")
        );
        // The client cancelled: a cancel it asked for.
        assert_eq!(
            end(Cancelled, false, false, true),
            format!("finished {cancelled}")
        );
        assert_eq!(
            end(Cancelled, true, false, true),
            format!("finished {cancelled}")
        );
        // Nobody asked: the worker dropped it.
        assert_eq!(end(Cancelled, false, false, false), "lost");
    }

    #[test]
    fn after_a_segment_the_run_finishes_redirects_fails_over_or_fails() {
        use v1::FinishReason::{Cancelled, Length, Stop};
        let finished = SegmentEnd::Finished(v1::Finished {
            reason: Stop as i32,
            ..Default::default()
        });
        let interrupted = SegmentEnd::Interrupted(v1::Interrupt::default());
        let lost = SegmentEnd::Lost("stream reset".into());
        let moved = SegmentEnd::Moved(MoveReason::Preempt);
        let failed = |code: Code| {
            SegmentEnd::Failed(v1::Failed {
                code: code as i32,
                ..Default::default()
            })
        };
        // (end, cancelled, delivered of 10, worker available) -> next
        let cases = [
            (&finished, false, 3, true, Next::Finish(Stop as i32)),
            (&finished, true, 3, true, Next::Finish(Cancelled as i32)),
            (&lost, true, 3, true, Next::Finish(Cancelled as i32)),
            (
                &interrupted,
                false,
                3,
                true,
                Next::Redirect { same_worker: true },
            ),
            (
                &interrupted,
                false,
                3,
                false,
                Next::Redirect { same_worker: false },
            ),
            (&interrupted, false, 10, true, Next::Finish(Length as i32)),
            (&lost, false, 3, false, Next::Failover { full: false }),
            (
                &failed(Code::Unavailable),
                false,
                0,
                true,
                Next::Failover { full: false },
            ),
            (
                &failed(Code::ResourceExhausted),
                false,
                0,
                true,
                Next::Failover { full: true },
            ),
            (&failed(Code::InvalidArgument), false, 0, true, Next::Fail),
            (&failed(Code::Internal), false, 5, true, Next::Fail),
            (&moved, false, 5, true, Next::Move),
            (&moved, true, 5, true, Next::Finish(Cancelled as i32)),
        ];
        for (end, cancelled, delivered, available, expected) in cases {
            assert_eq!(
                after(end, cancelled, delivered, 10, available),
                expected,
                "{end:?} cancelled={cancelled} delivered={delivered} available={available}"
            );
        }
    }
}
