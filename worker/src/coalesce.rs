//! Token coalescing: engine tokens are batched into `Tokens` frames so a fast engine does not
//! cost one gRPC message per token. The first token is always sent at once (time to first token
//! is what interactive users feel); later tokens are flushed when a chunk is full or the oldest
//! unsent token has waited `flush_interval`.

use std::time::Duration;

use switchyard_proto::v1::{self, worker_frame::Frame};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::credit::Credit;
use crate::engine::{EngineError, EngineEvent, EngineStream, StopReason};
use crate::metrics::TokenClock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceConfig {
    /// Longest a generated token waits before it is sent.
    pub flush_interval: Duration,
    /// Most tokens in one chunk.
    pub max_chunk_tokens: usize,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(5),
            max_chunk_tokens: 16,
        }
    }
}

/// Why a generation nobody cancelled ended early.
const STOPPED: &str = "the worker stopped this generation before it finished (it is shutting \
     down); resume it on another worker";

/// Outcome of forwarding one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    pub tokens: u32,
}

/// Forwards one generation's events to `out` as coalesced `Tokens` frames followed by exactly
/// one `Finished` or `Failed` frame. `cancel_reason` is reported when the engine stopped because
/// it was cancelled (CANCELLED, or INTERRUPTED when the router is redirecting the request);
/// `None` there means nobody asked: the worker itself stopped the generation (shutting down
/// past its drain timeout), which is a failure the router resumes elsewhere, never a finish.
/// With `credit`, a token is sent only when there is credit for it.
pub async fn forward_generation(
    request_id: &str,
    mut events: EngineStream,
    config: CoalesceConfig,
    credit: Option<Credit>,
    cancel_reason: impl Fn() -> Option<v1::FinishReason>,
    out: &mpsc::Sender<v1::WorkerFrame>,
    clock: &mut TokenClock,
) -> Forwarded {
    let started = Instant::now();
    let mut first_token_at = None;
    let mut chunk = Chunk::default();
    let mut seq = 0u64;
    let mut forwarded = Forwarded { tokens: 0 };
    let mut deadline: Option<Instant> = None;
    let mut stop_sequence = String::new();
    let mut embedding = Vec::new();
    // One timer for the whole generation, re-armed once per chunk: a timer made afresh for
    // every event registers and clears a timer-wheel entry each time (most of a fast engine's
    // per-token cost in the worker).
    let flush = tokio::time::sleep_until(started);
    tokio::pin!(flush);
    let send = |frame: Frame| async move { out.send(v1::WorkerFrame { frame: Some(frame) }).await };

    let last = loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = &mut flush, if deadline.is_some() => {
                deadline = None;
                let _ = send(chunk.take(request_id, &mut seq)).await;
                continue;
            }
        };
        match event {
            Some(Ok(EngineEvent::Token { id, text, logprobs })) => {
                if let Some(credit) = &credit
                    && !credit.try_take()
                {
                    // Out of credit: what is ready goes out, then this token waits for a grant
                    // (and the engine, its buffer full, pauses the sequence).
                    if !chunk.ids.is_empty() {
                        deadline = None;
                        if send(chunk.take(request_id, &mut seq)).await.is_err() {
                            return forwarded;
                        }
                    }
                    credit.take().await;
                }
                clock.token();
                forwarded.tokens += 1;
                chunk.push(id, text, logprobs);
                let first = first_token_at.is_none();
                first_token_at.get_or_insert_with(Instant::now);
                if first || chunk.ids.len() >= config.max_chunk_tokens {
                    deadline = None;
                    if send(chunk.take(request_id, &mut seq)).await.is_err() {
                        return forwarded;
                    }
                } else if deadline.is_none() {
                    let at = Instant::now() + config.flush_interval;
                    deadline = Some(at);
                    flush.as_mut().reset(at);
                }
            }
            Some(Ok(EngineEvent::ToolCall(delta))) => {
                // It rides with the tokens that spelt it (already in the chunk, or sent); a
                // gateway's call comes without tokens, and as the first output it goes out at
                // once, as a first token does.
                chunk.tool_calls.push(delta);
                if first_token_at.is_none() {
                    first_token_at = Some(Instant::now());
                    deadline = None;
                    if send(chunk.take(request_id, &mut seq)).await.is_err() {
                        return forwarded;
                    }
                } else if deadline.is_none() {
                    let at = Instant::now() + config.flush_interval;
                    deadline = Some(at);
                    flush.as_mut().reset(at);
                }
            }
            Some(Ok(EngineEvent::StopSequence(stop))) => stop_sequence = stop,
            Some(Ok(EngineEvent::Embedding(vector))) => {
                // The vector is the answer: its time is the request's time to first output.
                first_token_at.get_or_insert_with(Instant::now);
                embedding = vector;
            }
            // It rides with the first token, which comes next and goes out at once.
            Some(Ok(EngineEvent::PromptLogprobs(entries))) => chunk.prompt_logprobs = entries,
            Some(Ok(EngineEvent::Done {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_prompt_tokens,
            })) => {
                let reason = match reason {
                    StopReason::Stop => v1::FinishReason::Stop,
                    StopReason::Length => v1::FinishReason::Length,
                    StopReason::ToolCalls => v1::FinishReason::ToolCalls,
                    StopReason::Cancelled => match cancel_reason() {
                        Some(reason) => reason,
                        None => {
                            break failed(request_id, &EngineError::Unavailable(STOPPED.into()));
                        }
                    },
                };
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                break Frame::Finished(v1::Finished {
                    request_id: request_id.to_string(),
                    reason: reason as i32,
                    usage: Some(v1::Usage {
                        prompt_tokens,
                        completion_tokens,
                        cached_prompt_tokens,
                    }),
                    timings: Some(v1::Timings {
                        ttft_ms: first_token_at.map(|t| ms(t - started)).unwrap_or_default(),
                        total_ms: ms(started.elapsed()),
                        queue_ms: 0.0,
                    }),
                    stop_sequence: std::mem::take(&mut stop_sequence),
                    embedding: std::mem::take(&mut embedding),
                    // A router names the worker; the worker itself leaves it out.
                    ..Default::default()
                });
            }
            Some(Err(error)) => break failed(request_id, &error),
            None => {
                break failed(
                    request_id,
                    &EngineError::Internal("engine ended the generation without a result".into()),
                );
            }
        }
    };
    if !chunk.is_empty() {
        let _ = send(chunk.take(request_id, &mut seq)).await;
    }
    let _ = send(last).await;
    forwarded
}

/// A `Failed` frame for `error`.
pub fn failed(request_id: &str, error: &EngineError) -> Frame {
    Frame::Failed(v1::Failed {
        request_id: request_id.to_string(),
        code: error.code() as i32,
        message: error.to_string(),
        field: error.field().unwrap_or_default().to_string(),
        reason: error.reason().unwrap_or_default().to_string(),
        ..Default::default()
    })
}

#[derive(Default)]
struct Chunk {
    ids: Vec<u32>,
    text: String,
    /// One per id when the request asked for log probabilities, else empty.
    logprobs: Vec<v1::TokenLogprobs>,
    tool_calls: Vec<v1::ToolCallDelta>,
    /// The scored prompt, until the first frame takes it.
    prompt_logprobs: Vec<v1::TokenLogprobs>,
}

impl Chunk {
    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.tool_calls.is_empty()
    }

    fn push(&mut self, id: u32, text: String, logprobs: Option<Box<v1::TokenLogprobs>>) {
        self.ids.push(id);
        self.text.push_str(&text);
        if let Some(logprobs) = logprobs {
            self.logprobs.push(*logprobs);
        }
    }

    fn take(&mut self, request_id: &str, seq: &mut u64) -> Frame {
        let frame = Frame::Tokens(v1::Tokens {
            request_id: request_id.to_string(),
            seq: *seq,
            text: std::mem::take(&mut self.text),
            token_ids: std::mem::take(&mut self.ids),
            logprobs: std::mem::take(&mut self.logprobs),
            tool_calls: std::mem::take(&mut self.tool_calls),
            prompt_logprobs: std::mem::take(&mut self.prompt_logprobs),
        });
        *seq += 1;
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(events: Vec<EngineEvent>, config: CoalesceConfig) -> Vec<Frame> {
        run_cancelled_by(events, config, Some(v1::FinishReason::Cancelled)).await
    }

    /// Forwards `events`, a cancel having been asked with `asked` (`None`: by nobody).
    async fn run_cancelled_by(
        events: Vec<EngineEvent>,
        config: CoalesceConfig,
        asked: Option<v1::FinishReason>,
    ) -> Vec<Frame> {
        let (etx, erx) = mpsc::channel(events.len() + 1);
        for e in events {
            etx.send(Ok(e)).await.unwrap();
        }
        drop(etx);
        let (otx, mut orx) = mpsc::channel(64);
        forward_generation(
            "r",
            erx.into(),
            config,
            None,
            move || asked,
            &otx,
            &mut TokenClock::unrecorded(),
        )
        .await;
        drop(otx);
        let mut frames = vec![];
        while let Some(f) = orx.recv().await {
            frames.push(f.frame.unwrap());
        }
        frames
    }

    fn token(i: u32) -> EngineEvent {
        EngineEvent::Token {
            id: i,
            text: format!("t{i}"),
            logprobs: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_nobody_asked_for_is_a_failure_to_resume_not_a_finish() {
        let cancelled = || {
            vec![
                token(0),
                EngineEvent::Done {
                    reason: StopReason::Cancelled,
                    prompt_tokens: 3,
                    completion_tokens: 1,
                    cached_prompt_tokens: 0,
                },
            ]
        };
        let config = CoalesceConfig::default();
        let frames = run_cancelled_by(cancelled(), config, None).await;
        match frames.last() {
            Some(Frame::Failed(f)) => {
                assert_eq!(f.code, tonic::Code::Unavailable as i32, "{f:?}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        let asked =
            run_cancelled_by(cancelled(), config, Some(v1::FinishReason::Interrupted)).await;
        match asked.last() {
            Some(Frame::Finished(f)) => {
                assert_eq!(f.reason, v1::FinishReason::Interrupted as i32);
            }
            other => panic!("expected Finished, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_stop_sequence_that_ended_it_is_in_finished() {
        let events = vec![
            token(0),
            EngineEvent::StopSequence("END".into()),
            EngineEvent::Done {
                reason: StopReason::Stop,
                prompt_tokens: 3,
                completion_tokens: 1,
                cached_prompt_tokens: 0,
            },
        ];
        let frames = run(events, CoalesceConfig::default()).await;
        match frames.last() {
            Some(Frame::Finished(f)) => {
                assert_eq!(f.reason, v1::FinishReason::Stop as i32);
                assert_eq!(f.stop_sequence, "END");
            }
            other => panic!("expected Finished, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_embedding_is_one_finished_frame_with_its_vector() {
        let events = vec![
            EngineEvent::Embedding(vec![0.6, 0.8]),
            EngineEvent::Done {
                reason: StopReason::Stop,
                prompt_tokens: 3,
                completion_tokens: 0,
                cached_prompt_tokens: 0,
            },
        ];
        let frames = run(events, CoalesceConfig::default()).await;
        let [Frame::Finished(f)] = frames.as_slice() else {
            panic!("expected one Finished, got {frames:?}");
        };
        assert_eq!(f.embedding, vec![0.6, 0.8]);
        assert_eq!(f.usage.map(|u| u.prompt_tokens), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn first_token_alone_then_full_chunks_then_finished() {
        let mut events: Vec<_> = (0..6).map(token).collect();
        events.push(EngineEvent::Done {
            reason: StopReason::Length,
            prompt_tokens: 3,
            completion_tokens: 6,
            cached_prompt_tokens: 0,
        });
        let frames = run(
            events,
            CoalesceConfig {
                flush_interval: Duration::from_secs(1),
                max_chunk_tokens: 2,
            },
        )
        .await;
        let chunks: Vec<(u64, Vec<u32>)> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Tokens(t) => Some((t.seq, t.token_ids.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            chunks,
            vec![(0, vec![0]), (1, vec![1, 2]), (2, vec![3, 4]), (3, vec![5])]
        );
        let Some(Frame::Finished(finished)) = frames.last() else {
            panic!("no Finished frame")
        };
        assert_eq!(finished.reason, v1::FinishReason::Length as i32);
        assert_eq!(finished.usage.unwrap().completion_tokens, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn tool_call_pieces_ride_with_their_tokens_and_a_first_call_goes_at_once() {
        let piece = |arguments: &str| {
            EngineEvent::ToolCall(v1::ToolCallDelta {
                arguments: arguments.into(),
                ..Default::default()
            })
        };
        let done = EngineEvent::Done {
            reason: StopReason::ToolCalls,
            prompt_tokens: 3,
            completion_tokens: 2,
            cached_prompt_tokens: 0,
        };
        let config = CoalesceConfig {
            flush_interval: Duration::from_secs(1),
            max_chunk_tokens: 4,
        };
        let pieces_per_chunk = |frames: &[Frame]| -> Vec<(Vec<u32>, usize)> {
            frames
                .iter()
                .filter_map(|f| match f {
                    Frame::Tokens(t) => Some((t.token_ids.clone(), t.tool_calls.len())),
                    _ => None,
                })
                .collect()
        };
        // A gateway's call, no tokens: the first piece alone and at once, the rest together.
        let started = Instant::now();
        let frames = run(vec![piece("{"), piece("}"), done.clone()], config).await;
        assert_eq!(pieces_per_chunk(&frames), vec![(vec![], 1), (vec![], 1)]);
        let Some(Frame::Finished(finished)) = frames.last() else {
            panic!("no Finished frame: {frames:?}")
        };
        assert_eq!(finished.reason, v1::FinishReason::ToolCalls as i32);
        assert!(finished.timings.unwrap().ttft_ms < 1.0, "{finished:?}");
        assert!(started.elapsed() < config.flush_interval);
        // An engine that spells the call in tokens: the pieces go with them.
        let frames = run(
            vec![token(0), piece("{"), token(1), piece("}"), done],
            config,
        )
        .await;
        assert_eq!(pieces_per_chunk(&frames), vec![(vec![0], 0), (vec![1], 2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_chunk_is_flushed_after_the_interval() {
        let (etx, erx) = mpsc::channel(8);
        let (otx, mut orx) = mpsc::channel(8);
        let config = CoalesceConfig {
            flush_interval: Duration::from_millis(5),
            max_chunk_tokens: 16,
        };
        let task = tokio::spawn(async move {
            forward_generation(
                "r",
                erx.into(),
                config,
                None,
                || Some(v1::FinishReason::Cancelled),
                &otx,
                &mut TokenClock::unrecorded(),
            )
            .await
        });
        for i in 0..3 {
            etx.send(Ok(token(i))).await.unwrap();
        }
        let first = orx.recv().await.unwrap().frame.unwrap();
        assert!(matches!(first, Frame::Tokens(ref t) if t.token_ids == vec![0]));
        // Nothing else arrives: the two buffered tokens must still be flushed by the timer.
        let second = orx.recv().await.unwrap().frame.unwrap();
        assert!(
            matches!(second, Frame::Tokens(ref t) if t.token_ids == vec![1, 2] && t.text == "t1t2")
        );
        drop(etx);
        assert_eq!(task.await.unwrap().tokens, 3);
    }

    #[tokio::test]
    async fn engine_errors_become_failed_frames() {
        let (etx, erx) = mpsc::channel(2);
        etx.send(Ok(token(0))).await.unwrap();
        etx.send(Err(EngineError::ResourceExhausted("kv full".into())))
            .await
            .unwrap();
        drop(etx);
        let (otx, mut orx) = mpsc::channel(8);
        forward_generation(
            "r",
            erx.into(),
            CoalesceConfig::default(),
            None,
            || Some(v1::FinishReason::Cancelled),
            &otx,
            &mut TokenClock::unrecorded(),
        )
        .await;
        orx.recv().await.unwrap();
        let Some(Frame::Failed(f)) = orx.recv().await.unwrap().frame else {
            panic!("expected Failed")
        };
        assert_eq!(f.code, tonic::Code::ResourceExhausted as i32);
        assert_eq!(f.message, "kv full");
    }

    #[tokio::test]
    async fn tokens_beyond_the_credit_wait_for_a_grant_and_the_engine_buffer_fills() {
        let (etx, erx) = mpsc::channel(4);
        let (otx, mut orx) = mpsc::channel(64);
        let cancel = tokio_util::sync::CancellationToken::new();
        let credit = Credit::new(3, cancel).expect("flow controlled");
        let task = tokio::spawn({
            let credit = credit.clone();
            async move {
                forward_generation(
                    "r",
                    erx.into(),
                    CoalesceConfig {
                        flush_interval: Duration::from_secs(3600),
                        max_chunk_tokens: 16,
                    },
                    Some(credit),
                    || Some(v1::FinishReason::Cancelled),
                    &otx,
                    &mut TokenClock::unrecorded(),
                )
                .await
            }
        });
        // The engine produces 8 tokens as fast as its buffer allows.
        let engine = tokio::spawn(async move {
            for i in 0..8 {
                etx.send(Ok(token(i))).await.unwrap();
            }
            etx.send(Ok(EngineEvent::Done {
                reason: StopReason::Length,
                prompt_tokens: 1,
                completion_tokens: 8,
                cached_prompt_tokens: 0,
            }))
            .await
            .unwrap();
        });
        let mut sent = Vec::new();
        while sent.len() < 3 {
            let Some(Frame::Tokens(t)) = orx.recv().await.unwrap().frame else {
                panic!("tokens expected")
            };
            sent.extend(t.token_ids);
        }
        assert_eq!(sent, vec![0, 1, 2], "exactly the credit, flushed at once");
        // Without credit nothing more is taken from the engine: it is stuck on a full buffer.
        assert!(orx.try_recv().is_err());
        assert!(!engine.is_finished());
        credit.grant(100);
        let mut rest = Vec::new();
        let finished = loop {
            match orx.recv().await.unwrap().frame.unwrap() {
                Frame::Tokens(t) => rest.extend(t.token_ids),
                Frame::Finished(f) => break f,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(
            rest,
            (3..8).collect::<Vec<u32>>(),
            "nothing lost or repeated"
        );
        assert_eq!(finished.usage.unwrap().completion_tokens, 8);
        assert_eq!(task.await.unwrap().tokens, 8);
    }
}
