//! The `Worker.Serve` service: one persistent stream per router, carrying many requests.
//! Each `Start` becomes an engine generation forwarded by its own task; `Cancel` fires that
//! generation's token; the worker's load rides along as `Load` frames, and an engine with a
//! prefix cache publishes what it holds as `KvEvents` frames (a snapshot first).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use switchyard_cluster::driven::DrivenReceiver;
use switchyard_cluster::telemetry::propagation::{self, RemoteContext};
use switchyard_proto::hosted::{Frames, StreamIncoming, StreamRequest};
use switchyard_proto::v1::{self, router_frame, worker_frame::Frame};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info, warn};

use crate::coalesce::{CoalesceConfig, failed, forward_generation};
use crate::credit::Credit;
use crate::engine::{Engine, EngineError, EngineRequest, Message, Prompt, Sampling};
use crate::kv_feed::KvFeed;
use crate::load::{LOAD_REPORT_INTERVAL, LoadTracker, ReportPacer};
use crate::metrics::WorkerMetrics;

/// Frames buffered per router stream before the worker waits for the router to read.
const STREAM_BUFFER: usize = 512;

#[derive(Clone)]
pub struct WorkerService {
    engine: Arc<dyn Engine>,
    load: Arc<LoadTracker>,
    coalesce: CoalesceConfig,
    metrics: WorkerMetrics,
    /// Fired at the end of a drain: every router stream is closed.
    closing: CancellationToken,
}

impl WorkerService {
    pub fn new(
        engine: Arc<dyn Engine>,
        load: Arc<LoadTracker>,
        coalesce: CoalesceConfig,
        metrics: WorkerMetrics,
        closing: CancellationToken,
    ) -> Self {
        Self {
            engine,
            load,
            coalesce,
            metrics,
            closing,
        }
    }
}

type FrameStream = Frames<v1::WorkerFrame>;

#[tonic::async_trait]
impl v1::worker_server::Worker for WorkerService {
    type ServeStream = FrameStream;

    async fn serve(
        &self,
        request: Request<Streaming<v1::RouterFrame>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        let peer = request.remote_addr();
        info!(?peer, "router stream opened");
        Ok(Response::new(
            self.open_stream(Box::pin(request.into_inner())),
        ))
    }

    async fn get_tokenizer(
        &self,
        request: Request<v1::TokenizerRequest>,
    ) -> Result<Response<v1::TokenizerSpec>, Status> {
        let model = request.into_inner().model;
        if !self.engine.models().contains(&model) {
            return Err(Status::not_found(format!(
                "model {model:?} is not served by this worker (it serves {:?})",
                self.engine.models()
            )));
        }
        let (format, spec) = self.engine.tokenizer_spec(&model).ok_or_else(|| {
            Status::not_found(format!(
                "this worker's {} engine does not tokenize: it publishes no tokenizer",
                self.engine.kind()
            ))
        })?;
        let context_length = self.engine.context_length(&model).unwrap_or(0);
        Ok(Response::new(v1::TokenizerSpec {
            model,
            format,
            spec,
            context_length,
        }))
    }
}

/// A generation running on behalf of one router stream.
struct Running {
    cancel: CancellationToken,
    credit: Option<Credit>,
    reason: Arc<Mutex<Option<v1::FinishReason>>>,
}

impl WorkerService {
    /// Serves the streams the router hosting this worker opens (see
    /// [`switchyard_proto::hosted`]) until it stops opening them.
    pub async fn serve_hosted(&self, mut incoming: StreamIncoming) {
        while let Some(StreamRequest { frames, reply }) = incoming.next().await {
            info!("hosting router's stream opened");
            let _ = reply.send(self.open_stream(frames));
        }
    }

    /// Serves one router stream: the worker's frames. The stream's own work (reading the
    /// router's frames, starting generations, load reports) runs in the task that writes the
    /// frames out — for a hosting router, its link's task — so a start is taken up without
    /// waking another task; the generations send their frames from tasks of their own.
    fn open_stream(&self, inbound: Frames<v1::RouterFrame>) -> FrameStream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let run = self.clone().run_stream(inbound, tx);
        Box::pin(DrivenReceiver::new(rx, run).map(Ok))
    }

    async fn run_stream(
        self,
        mut inbound: Frames<v1::RouterFrame>,
        tx: mpsc::Sender<v1::WorkerFrame>,
    ) {
        // Generations send their frames straight into the stream (each in order), not through
        // this task: a hop less for every token.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut load = self.load.subscribe();
        load.mark_changed();
        let mut pacer = ReportPacer::new(LOAD_REPORT_INTERVAL);
        let mut starts_seen = 0u64;
        let mut kv = self.engine.prefix_cache().map(KvFeed::new);
        // The snapshot goes before anything else, so the router knows the cache before it
        // places on this worker.
        if let Some(feed) = kv.as_mut() {
            let frame = v1::WorkerFrame {
                frame: Some(Frame::KvEvents(feed.next().await)),
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }

        loop {
            tokio::select! {
                frame = inbound.next() => match frame.transpose() {
                    Ok(Some(v1::RouterFrame { frame: Some(frame) })) => {
                        if matches!(frame, router_frame::Frame::Start(_)) {
                            starts_seen += 1;
                            // The router counts this start against our slots until a report
                            // says we took it.
                            load.mark_changed();
                        }
                        self.handle(frame, &mut running, &tx, &done_tx).await;
                    }
                    Ok(Some(_)) => debug!("empty router frame ignored"),
                    Ok(None) => break,
                    Err(status) => {
                        debug!(%status, "router stream failed");
                        break;
                    }
                },
                Some(request_id) = done_rx.recv() => {
                    running.remove(&request_id);
                }
                events = next_kv(&mut kv) => {
                    let frame = v1::WorkerFrame { frame: Some(Frame::KvEvents(events)) };
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
                Ok(()) = load.changed(), if !pacer.holding() => {
                    if !pacer.may_report(Instant::now()) {
                        // Seen: the report that ends the pause takes the latest load.
                        load.borrow_and_update();
                        continue;
                    }
                    if !report_load(&mut load, starts_seen, &mut pacer, &tx).await {
                        break;
                    }
                }
                () = pacer.due() => {
                    if !report_load(&mut load, starts_seen, &mut pacer, &tx).await {
                        break;
                    }
                }
                _ = self.closing.cancelled() => break,
                // The router stopped reading.
                () = tx.closed() => break,
            }
        }
        // The router is gone (or we are shutting down): nobody will read these generations.
        for (request_id, generation) in running {
            debug!(%request_id, "cancelling generation of a closed router stream");
            generation.cancel.cancel();
        }
        info!("router stream closed");
    }

    async fn handle(
        &self,
        frame: router_frame::Frame,
        running: &mut HashMap<String, Running>,
        frames: &mpsc::Sender<v1::WorkerFrame>,
        done: &mpsc::UnboundedSender<String>,
    ) {
        match frame {
            router_frame::Frame::Start(start) => {
                let request_id = start.request_id.clone();
                if let Err(error) = self.start(start, running, frames, done) {
                    let frame = v1::WorkerFrame {
                        frame: Some(failed(&request_id, &error)),
                    };
                    let _ = frames.send(frame).await;
                }
            }
            router_frame::Frame::Cancel(cancel) => match running.get(&cancel.request_id) {
                Some(generation) => {
                    let reason = match v1::FinishReason::try_from(cancel.reason) {
                        Ok(v1::FinishReason::Interrupted) => v1::FinishReason::Interrupted,
                        _ => v1::FinishReason::Cancelled,
                    };
                    *generation.reason.lock().expect("reason lock") = Some(reason);
                    generation.cancel.cancel();
                }
                None => {
                    debug!(request_id = %cancel.request_id, "cancel for an unknown or finished request")
                }
            },
            router_frame::Frame::Credit(grant) => {
                if let Some(credit) = running
                    .get(&grant.request_id)
                    .and_then(|r| r.credit.as_ref())
                {
                    credit.grant(grant.tokens);
                }
            }
        }
    }

    fn start(
        &self,
        start: v1::WorkerStart,
        running: &mut HashMap<String, Running>,
        frames: &mpsc::Sender<v1::WorkerFrame>,
        done: &mpsc::UnboundedSender<String>,
    ) -> Result<(), EngineError> {
        if self.load.is_draining() {
            return Err(EngineError::Unavailable(
                "worker is draining; place the request elsewhere".into(),
            ));
        }
        if running.contains_key(&start.request_id) {
            return Err(EngineError::InvalidArgument(format!(
                "request_id {:?} is already running on this stream",
                start.request_id
            )));
        }
        // The generation's span continues the router's trace for this request.
        let span = tracing::info_span!(
            "worker.generate",
            otel.kind = "server",
            request_id = %start.request_id,
            client_request_id = %start.client_request_id,
            model = %start.model,
            // The same spelling as the router's span, so one query finds both halves.
            lane = v1::Lane::try_from(start.lane).unwrap_or(v1::Lane::Unspecified).label(),
        );
        propagation::set_parent(&span, RemoteContext::from_map(&start.trace_context));
        let mut clock = self.metrics.generation(start.lane, &start.model);
        let credit_tokens = start.credit_tokens;
        let request = engine_request(start)?;
        if request.sampling.prompt_logprobs.is_some() && !self.engine.scores_prompts() {
            return Err(EngineError::invalid_field(
                "sampling.prompt_logprobs",
                format!(
                    "this worker's engine ({}) cannot score a prompt; a GPU worker running the \
                     model can",
                    self.engine.kind()
                ),
            ));
        }
        if request.embed && !self.engine.embeds() {
            return Err(EngineError::invalid_field(
                "embed",
                format!(
                    "this worker's engine ({}) cannot embed a prompt; a GPU worker running the \
                     model can",
                    self.engine.kind()
                ),
            ));
        }
        let request_id = request.request_id.clone();
        let cancel = CancellationToken::new();
        let credit = Credit::new(credit_tokens, cancel.clone());
        let events = span.in_scope(|| self.engine.submit(request, cancel.clone()))?;
        let reason = Arc::new(Mutex::new(None));
        running.insert(
            request_id.clone(),
            Running {
                cancel,
                credit: credit.clone(),
                reason: reason.clone(),
            },
        );
        self.load.started();

        let (frames, done, load, coalesce) = (
            frames.clone(),
            done.clone(),
            self.load.clone(),
            self.coalesce,
        );
        tokio::spawn(
            async move {
                let cancel_reason = move || *reason.lock().expect("reason lock");
                let forwarded = forward_generation(
                    &request_id,
                    events,
                    coalesce,
                    credit,
                    cancel_reason,
                    &frames,
                    &mut clock,
                )
                .await;
                info!(tokens = forwarded.tokens, "generation ended");
                load.finished(forwarded.tokens);
                let _ = done.send(request_id);
            }
            .instrument(span),
        );
        Ok(())
    }
}

/// Sends the current load on a router stream; `false` when the router stopped reading.
async fn report_load(
    load: &mut watch::Receiver<v1::Load>,
    starts_seen: u64,
    pacer: &mut ReportPacer,
    tx: &mpsc::Sender<v1::WorkerFrame>,
) -> bool {
    let snapshot = v1::Load {
        starts_seen: Some(starts_seen),
        ..*load.borrow_and_update()
    };
    pacer.reported(Instant::now());
    let frame = v1::WorkerFrame {
        frame: Some(Frame::Load(snapshot)),
    };
    tx.send(frame).await.is_ok()
}

/// The next `KvEvents` frame of a stream's feed; never, for engines without a prefix cache.
async fn next_kv(feed: &mut Option<KvFeed>) -> v1::KvEvents {
    match feed {
        Some(feed) => feed.next().await,
        None => std::future::pending().await,
    }
}

fn engine_request(start: v1::WorkerStart) -> Result<EngineRequest, EngineError> {
    let prompt = if start.messages.is_empty() {
        Prompt::Text(start.prompt)
    } else {
        Prompt::Chat(
            start
                .messages
                .into_iter()
                .map(|m| Message {
                    role: m.role,
                    content: m.content,
                    tool_calls: m.tool_calls,
                    tool_call_id: m.tool_call_id,
                })
                .collect(),
        )
    };
    let sampling = start.sampling.unwrap_or_default();
    if sampling.max_tokens == 0 {
        return Err(EngineError::InvalidArgument(
            "sampling.max_tokens: must be at least 1".into(),
        ));
    }
    if !start.min_tokens_per_s.is_finite() || start.min_tokens_per_s < 0.0 {
        return Err(EngineError::InvalidArgument(format!(
            "min_tokens_per_s: must be a finite number of tokens per second, 0 or more (got {})",
            start.min_tokens_per_s
        )));
    }
    if start.resume_tokens.len() >= sampling.max_tokens as usize {
        warn!(request_id = %start.request_id, "resume_tokens already reach max_tokens");
    }
    Ok(EngineRequest {
        request_id: start.request_id,
        model: start.model,
        prompt,
        sampling: Sampling {
            max_tokens: sampling.max_tokens,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            seed: sampling.seed,
            stop: sampling.stop,
            presence_penalty: sampling.presence_penalty,
            frequency_penalty: sampling.frequency_penalty,
            repetition_penalty: sampling.repetition_penalty,
            logit_bias: {
                let mut bias: Vec<(u32, f32)> = sampling.logit_bias.into_iter().collect();
                bias.sort_unstable_by_key(|(id, _)| *id);
                bias
            },
            logprobs: sampling.logprobs.then_some(sampling.top_logprobs),
            prompt_logprobs: sampling.prompt_logprobs.then_some(sampling.top_logprobs),
            ignore_eos: sampling.ignore_eos,
            min_p: sampling.min_p,
            response_format: sampling.response_format,
        },
        resume_tokens: start.resume_tokens,
        latency_critical: start.lane == v1::Lane::LatencyCritical as i32,
        min_tokens_per_s: start.min_tokens_per_s,
        prompt_ids: (!start.prompt_token_ids.is_empty()).then_some(start.prompt_token_ids),
        tools: crate::Tools {
            tools: start.tools,
            choice: start.tool_choice.unwrap_or_default(),
        },
        embed: start.embed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(min_tokens_per_s: f64) -> v1::WorkerStart {
        v1::WorkerStart {
            request_id: "r".into(),
            model: "m".into(),
            prompt: "hello".into(),
            sampling: Some(v1::SamplingParams {
                max_tokens: 4,
                ..Default::default()
            }),
            lane: v1::Lane::LatencyCritical as i32,
            min_tokens_per_s,
            ..Default::default()
        }
    }

    #[test]
    fn the_promised_decode_rate_reaches_the_engine() {
        let request = engine_request(start(20.0)).expect("valid");
        assert_eq!(request.min_tokens_per_s, 20.0);
        assert!(request.latency_critical);
        assert_eq!(engine_request(start(0.0)).unwrap().min_tokens_per_s, 0.0);
    }

    #[test]
    fn a_negative_or_non_finite_decode_rate_is_refused_by_name() {
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            match engine_request(start(bad)) {
                Err(EngineError::InvalidArgument(message)) => {
                    assert!(message.starts_with("min_tokens_per_s:"), "{message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
