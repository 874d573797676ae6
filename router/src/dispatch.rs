//! The per-request dispatcher: validates and places a request, starts it on a worker, forwards
//! its tokens to the client with gap-free sequence numbers, and handles `Cancel`, `Interrupt`
//! (stop, then continue the same request with new instructions, on the same worker when
//! possible) and failover (another worker resumes after the tokens the client already has).

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1::{self, server_frame::Frame, worker_frame};
use switchyard_proto::{RequestLimits, validate_generate_request};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::classify::classify;
use crate::config::RouterConfig;
use crate::links::{Link, LinkEvent, Links};
use crate::policy::{PlacementError, place};

/// A client's instruction about a running request.
#[derive(Debug)]
pub enum Control {
    Cancel,
    Interrupt(v1::Interrupt),
}

/// Shared by every request the router handles.
pub struct Dispatcher {
    pub links: Arc<Links>,
    pub config: RouterConfig,
}

/// A validated, placed request, ready to run.
pub struct Prepared {
    request: v1::GenerateRequest,
    lane: v1::Lane,
    reason: String,
    link: Arc<Link>,
    arrived: Instant,
}

pub type FrameSink = mpsc::Sender<Result<v1::ServerFrame, Status>>;

impl Dispatcher {
    pub fn limits(&self) -> &RequestLimits {
        &self.config.limits
    }

    /// Validates, classifies and places `request`. Errors carry the status the client gets.
    pub fn prepare(&self, request: v1::GenerateRequest) -> Result<Prepared, Status> {
        let arrived = Instant::now();
        validate_generate_request(&request, &self.config.limits)
            .map_err(|violation| Status::invalid_argument(violation.to_string()))?;
        let class = classify(&request, self.config.default_lane);
        let placement = place(&self.links.states(), class.lane, &request.model, &[])
            .map_err(placement_status)?;
        let link = self.links.get(&placement.worker_id).ok_or_else(|| {
            Status::unavailable(format!("worker {} just left", placement.worker_id))
        })?;
        Ok(Prepared {
            lane: class.lane,
            reason: format!("{}; {}", class.reason, placement.reason),
            request,
            link,
            arrived,
        })
    }

    /// Runs a prepared request to its end, writing its frames to `out`. `controls` carries the
    /// client's Cancel/Interrupt frames; when it closes, the request simply runs on. A closed
    /// `out` (client gone) cancels the generation.
    pub async fn run(
        &self,
        prepared: Prepared,
        mut controls: mpsc::UnboundedReceiver<Control>,
        out: FrameSink,
    ) {
        let link = prepared.link.clone();
        let mut run = Run::new(prepared, self);
        let result = run.drive(link, &mut controls, &out).await;
        if let Err(status) = result {
            let _ = out
                .send(Ok(failed_frame(&run.request.request_id, &status)))
                .await;
        }
    }
}

fn placement_status(error: PlacementError) -> Status {
    match error {
        PlacementError::UnknownModel(_) => Status::not_found(format!("model: {error}")),
        PlacementError::NoWorker(_) => Status::unavailable(error.to_string()),
    }
}

/// A `Failed` frame carrying `status`.
pub fn failed_frame(request_id: &str, status: &Status) -> v1::ServerFrame {
    v1::ServerFrame {
        frame: Some(Frame::Failed(v1::Failed {
            request_id: request_id.to_string(),
            code: status.code() as i32,
            message: status.message().to_string(),
        })),
    }
}

/// State of one client request across worker generations (segments).
struct Run<'d> {
    dispatcher: &'d Dispatcher,
    request: v1::GenerateRequest,
    lane: v1::Lane,
    reason: String,
    arrived: Instant,
    first_token: Option<Instant>,
    /// Next client chunk sequence number.
    seq: u64,
    /// Token ids and text of the current segment already sent to the client.
    segment_ids: Vec<u32>,
    segment_text: String,
    /// Tokens sent to the client across all segments.
    delivered: u32,
    prompt_tokens: u32,
    attempts: u32,
    cancelled: bool,
}

/// What ended a segment.
enum SegmentEnd {
    Finished(v1::Finished),
    Interrupted(v1::Interrupt),
    Lost(String),
    Failed(v1::Failed),
}

impl<'d> Run<'d> {
    fn new(prepared: Prepared, dispatcher: &'d Dispatcher) -> Self {
        Self {
            dispatcher,
            request: prepared.request,
            lane: prepared.lane,
            reason: prepared.reason,
            arrived: prepared.arrived,
            first_token: None,
            seq: 0,
            segment_ids: Vec::new(),
            segment_text: String::new(),
            delivered: 0,
            prompt_tokens: 0,
            attempts: 1,
            cancelled: false,
        }
    }

    async fn drive(
        &mut self,
        mut link: Arc<Link>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Result<(), Status> {
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
        info!(request_id = %self.request.request_id, lane = self.lane.label(), worker = %record.id, reason = %self.reason, "accepted");

        let mut excluded = Vec::new();
        loop {
            let end = self.segment(&link, controls, out).await?;
            match end {
                SegmentEnd::Finished(finished) => {
                    let reason = if self.cancelled {
                        v1::FinishReason::Cancelled as i32
                    } else {
                        finished.reason
                    };
                    self.prompt_tokens = finished
                        .usage
                        .map(|u| u.prompt_tokens)
                        .unwrap_or(self.prompt_tokens);
                    return self.finish(reason, out).await;
                }
                SegmentEnd::Interrupted(interrupt) => {
                    if self.delivered >= self.max_tokens() {
                        // The budget ran out before the redirect could take effect.
                        return self.finish(v1::FinishReason::Length as i32, out).await;
                    }
                    self.redirect(interrupt);
                    // Prefer the same worker: its KV cache holds this conversation.
                    if !link.state().available {
                        link = self.replace(&link, &mut excluded)?;
                    }
                }
                SegmentEnd::Lost(why) => {
                    warn!(request_id = %self.request.request_id, worker = %link.id(), %why, delivered = self.segment_ids.len(), "worker lost mid-request; failing over");
                    link = self.replace(&link, &mut excluded)?;
                }
                SegmentEnd::Failed(failed) => {
                    let code = Code::from_i32(failed.code);
                    let retriable = matches!(code, Code::Unavailable | Code::ResourceExhausted);
                    if !retriable {
                        return Err(Status::new(code, failed.message));
                    }
                    debug!(request_id = %self.request.request_id, worker = %link.id(), message = %failed.message, "worker refused; placing elsewhere");
                    link = self.replace(&link, &mut excluded)?;
                }
            }
        }
    }

    /// Picks another worker after `failed` could not serve the request.
    fn replace(
        &mut self,
        failed: &Arc<Link>,
        excluded: &mut Vec<String>,
    ) -> Result<Arc<Link>, Status> {
        self.attempts += 1;
        if self.attempts > self.dispatcher.config.max_attempts {
            return Err(Status::unavailable(format!(
                "gave up after {} attempts; last worker {} failed",
                self.dispatcher.config.max_attempts,
                failed.id()
            )));
        }
        excluded.push(failed.id());
        let placement = place(
            &self.dispatcher.links.states(),
            self.lane,
            &self.request.model,
            excluded,
        )
        .map_err(placement_status)?;
        self.dispatcher
            .links
            .get(&placement.worker_id)
            .ok_or_else(|| Status::unavailable(format!("worker {} just left", placement.worker_id)))
    }

    /// Runs one generation on `link` until it ends one way or another.
    async fn segment(
        &mut self,
        link: &Arc<Link>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Result<SegmentEnd, Status> {
        let generation_id = self.dispatcher.links.next_generation_id();
        let mut events = match link.start(self.worker_start(&generation_id)) {
            Ok(events) => events,
            Err(why) => return Ok(SegmentEnd::Lost(why)),
        };
        let mut controls_open = true;
        let mut interrupt: Option<v1::Interrupt> = None;
        let mut cancel_deadline: Option<Instant> = None;
        let end = loop {
            let grace = async {
                match cancel_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.recv() => match event {
                    Some(LinkEvent::Frame(worker_frame::Frame::Tokens(tokens))) => {
                        self.forward(tokens, out).await?;
                    }
                    Some(LinkEvent::Frame(worker_frame::Frame::Finished(finished))) => {
                        break match interrupt.take() {
                            Some(i) if !self.cancelled => SegmentEnd::Interrupted(i),
                            _ => SegmentEnd::Finished(finished),
                        };
                    }
                    Some(LinkEvent::Frame(worker_frame::Frame::Failed(failed))) => break SegmentEnd::Failed(failed),
                    Some(LinkEvent::Frame(worker_frame::Frame::Load(_))) => {}
                    Some(LinkEvent::Lost(why)) => break SegmentEnd::Lost(why),
                    None => break SegmentEnd::Lost("link closed".into()),
                },
                control = controls.recv(), if controls_open => match control {
                    Some(Control::Cancel) => {
                        self.cancelled = true;
                        link.cancel(&generation_id, v1::FinishReason::Cancelled);
                        cancel_deadline.get_or_insert(Instant::now() + self.dispatcher.config.cancel_grace);
                    }
                    Some(Control::Interrupt(i)) => {
                        link.cancel(&generation_id, v1::FinishReason::Interrupted);
                        interrupt = Some(i);
                    }
                    None => controls_open = false,
                },
                _ = out.closed() => {
                    debug!(request_id = %self.request.request_id, "client went away; cancelling");
                    link.cancel(&generation_id, v1::FinishReason::Cancelled);
                    link.forget(&generation_id);
                    return Err(Status::cancelled("client went away"));
                }
                _ = grace => {
                    warn!(request_id = %self.request.request_id, worker = %link.id(), "worker did not confirm the cancel in time");
                    link.forget(&generation_id);
                    break SegmentEnd::Finished(v1::Finished::default());
                }
            }
        };
        if self.cancelled {
            // A cancel wins over whatever else ended the segment: no failover, no redirect.
            return Ok(match end {
                SegmentEnd::Finished(f) => SegmentEnd::Finished(f),
                _ => SegmentEnd::Finished(v1::Finished::default()),
            });
        }
        Ok(end)
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
        v1::WorkerStart {
            request_id: generation_id.to_string(),
            model: self.request.model.clone(),
            messages: self.request.messages.clone(),
            prompt: self.request.prompt.clone(),
            sampling: Some(sampling),
            resume_tokens: self.segment_ids.clone(),
        }
    }

    async fn forward(&mut self, tokens: v1::Tokens, out: &FrameSink) -> Result<(), Status> {
        if tokens.token_ids.is_empty() && tokens.text.is_empty() {
            return Ok(());
        }
        self.first_token.get_or_insert_with(Instant::now);
        self.delivered += tokens.token_ids.len() as u32;
        self.segment_ids.extend_from_slice(&tokens.token_ids);
        self.segment_text.push_str(&tokens.text);
        let frame = Frame::Tokens(v1::Tokens {
            request_id: self.request.request_id.clone(),
            seq: self.seq,
            text: tokens.text,
            token_ids: tokens.token_ids,
        });
        self.seq += 1;
        send(out, frame).await
    }

    /// Rewrites the conversation for an interrupt: the generated text (if kept) becomes an
    /// assistant turn, then the new messages follow; the next segment starts fresh.
    fn redirect(&mut self, interrupt: v1::Interrupt) {
        if self.request.messages.is_empty() {
            let prompt = std::mem::take(&mut self.request.prompt);
            self.request.messages.push(v1::ChatMessage {
                role: "user".into(),
                content: prompt,
            });
        }
        let generated = std::mem::take(&mut self.segment_text);
        if interrupt.keep_generated && !generated.is_empty() {
            self.request.messages.push(v1::ChatMessage {
                role: "assistant".into(),
                content: generated,
            });
        }
        self.request.messages.extend(interrupt.messages);
        self.segment_ids.clear();
        info!(request_id = %self.request.request_id, keep_generated = interrupt.keep_generated, "interrupted; continuing with new instructions");
    }

    async fn finish(&self, reason: i32, out: &FrameSink) -> Result<(), Status> {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let finished = Frame::Finished(v1::Finished {
            request_id: self.request.request_id.clone(),
            reason,
            usage: Some(v1::Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.delivered,
            }),
            timings: Some(v1::Timings {
                ttft_ms: self
                    .first_token
                    .map(|t| ms(t - self.arrived))
                    .unwrap_or_default(),
                total_ms: ms(self.arrived.elapsed()),
                queue_ms: 0.0,
            }),
        });
        send(out, finished).await
    }
}

async fn send(out: &FrameSink, frame: Frame) -> Result<(), Status> {
    out.send(Ok(v1::ServerFrame { frame: Some(frame) }))
        .await
        .map_err(|_| Status::cancelled("client went away"))
}
