//! What a request's client has been sent, kept where both senders of its tokens reach it: the
//! request's run and, while the client keeps up, the worker link's task, which hands each token
//! chunk of the current segment straight to the client instead of waking the run for it (see
//! [`TokenSink`]). Either way a chunk is numbered, counted and recorded (for a failover's
//! resume and an interrupt's kept text) in the same step that queues it for the client, so
//! what the run reads here is exactly what the client gets.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use switchyard_cluster::Pool;
use switchyard_proto::v1::{self, server_frame::Frame};
use tokio::time::Instant;

use super::FrameSink;
use crate::error::DispatchError;
use crate::links::TokenSink;
use crate::metrics::StreamMetrics;
use crate::placer::Pace;
use crate::report::Reporter;

/// One request's token delivery (see the module docs).
pub(super) struct Delivery {
    /// The client's id for the request.
    request_id: String,
    out: FrameSink,
    arrived: Instant,
    /// Tokens generated so far, as the placement task sees them.
    generated: Arc<AtomicU32>,
    reports: Reporter,
    sent: Mutex<Sent>,
}

/// The tokens a client has been sent, and where the current segment's come from.
#[derive(Default)]
pub(super) struct Sent {
    /// The generation whose chunks its link may deliver directly; none between segments.
    pub(super) generation: Option<String>,
    /// Next client chunk sequence number.
    pub(super) seq: u64,
    /// Tokens sent across all segments.
    pub(super) delivered: u32,
    /// Token ids and text of the current segment.
    pub(super) segment_ids: Vec<u32>,
    pub(super) segment_text: String,
    pub(super) first_token: Option<Instant>,
    /// When the last chunk went out (inter-token latency).
    pub(super) last_token: Option<Instant>,
    /// The current worker's pool and token series, and the request's pace there while the
    /// placement task may move it.
    pub(super) pool: Option<Pool>,
    pub(super) metrics: Option<StreamMetrics>,
    pub(super) pace: Option<Arc<Pace>>,
}

impl Delivery {
    /// Delivery of the tokens of request `request_id`, which arrived at `arrived`, to `out`.
    pub(super) fn new(
        request_id: String,
        out: FrameSink,
        arrived: Instant,
        reports: Reporter,
    ) -> Self {
        Self {
            request_id,
            out,
            arrived,
            generated: Arc::default(),
            reports,
            sent: Mutex::default(),
        }
    }

    pub(super) fn arrived(&self) -> Instant {
        self.arrived
    }

    /// Tokens generated so far, as the placement task sees them (see `ListedRun`).
    pub(super) fn generated(&self) -> &Arc<AtomicU32> {
        &self.generated
    }

    pub(super) fn sent(&self) -> MutexGuard<'_, Sent> {
        self.sent.lock().expect("delivery lock")
    }

    /// Sends `tokens` to the client, waiting for room.
    pub(super) async fn send(&self, tokens: v1::Tokens) -> Result<(), DispatchError> {
        if is_empty(&tokens) {
            return Ok(());
        }
        let permit = self
            .out
            .reserve()
            .await
            .map_err(|_| DispatchError::ClientGone)?;
        let frame = self.frame(&mut self.sent(), tokens.token_ids, tokens.text);
        permit.send(frame);
        Ok(())
    }

    /// Counts and records a chunk going out now, and makes its frame.
    fn frame(&self, sent: &mut Sent, token_ids: Vec<u32>, text: String) -> v1::ServerFrame {
        let count = token_ids.len() as u32;
        let now = Instant::now();
        sent.first_token.get_or_insert(now);
        let (gap, first) = match sent.last_token.replace(now) {
            Some(previous) => (now - previous, false),
            None => (now - self.arrived, true),
        };
        if let Some(metrics) = &sent.metrics {
            metrics.tokens(count, gap, first);
        }
        if let Some(pace) = &sent.pace {
            pace.tokens(count);
        }
        self.generated.fetch_add(count, Ordering::Relaxed);
        if let Some(pool) = sent.pool {
            self.reports.tokens(pool, count);
        }
        sent.delivered += count;
        sent.segment_ids.extend_from_slice(&token_ids);
        sent.segment_text.push_str(&text);
        let seq = sent.seq;
        sent.seq += 1;
        v1::ServerFrame {
            frame: Some(Frame::Tokens(v1::Tokens {
                request_id: self.request_id.clone(),
                seq,
                text,
                token_ids,
            })),
        }
    }
}

impl TokenSink for Delivery {
    fn try_deliver(&self, tokens: &mut v1::Tokens) -> bool {
        let mut sent = self.sent();
        if sent.generation.as_deref() != Some(tokens.request_id.as_str()) {
            return false;
        }
        if is_empty(tokens) {
            return true;
        }
        let Some(permit) = self.out.try_reserve() else {
            return false;
        };
        let (token_ids, text) = (
            std::mem::take(&mut tokens.token_ids),
            std::mem::take(&mut tokens.text),
        );
        let frame = self.frame(&mut sent, token_ids, text);
        permit.send(frame);
        true
    }
}

fn is_empty(tokens: &v1::Tokens) -> bool {
    tokens.token_ids.is_empty() && tokens.text.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::frame_channel;

    fn chunk(generation: &str, ids: &[u32], text: &str) -> v1::Tokens {
        v1::Tokens {
            request_id: generation.into(),
            token_ids: ids.to_vec(),
            text: text.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn direct_and_awaited_chunks_share_one_gap_free_sequence_and_the_segments_record() {
        let (out, mut client) = frame_channel(2);
        let delivery = Delivery::new("r1".into(), out, Instant::now(), Reporter::disabled());
        // Between segments, and for any other generation, the link delivers nothing.
        let mut early = chunk("g1", &[1], "a");
        assert!(!delivery.try_deliver(&mut early));
        delivery.sent().generation = Some("g1".into());
        let mut stray = chunk("g0", &[9], "z");
        assert!(!delivery.try_deliver(&mut stray));
        assert_eq!(stray.token_ids, [9], "a refused chunk is left as it was");

        assert!(delivery.try_deliver(&mut early));
        delivery.send(chunk("g1", &[2, 3], "bc")).await.unwrap();
        // The client's buffer (2 frames) is full: refused, untouched.
        let mut late = chunk("g1", &[4], "d");
        assert!(!delivery.try_deliver(&mut late));
        assert_eq!(
            (late.token_ids.as_slice(), late.text.as_str()),
            (&[4][..], "d")
        );

        let mut seen = Vec::new();
        for _ in 0..2 {
            match client.recv().await.unwrap().unwrap().frame {
                Some(Frame::Tokens(tokens)) => {
                    assert_eq!(tokens.request_id, "r1", "named as the client named it");
                    seen.push((tokens.seq, tokens.token_ids));
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert_eq!(seen, [(0, vec![1]), (1, vec![2, 3])]);
        assert!(delivery.try_deliver(&mut late));
        let sent = delivery.sent();
        assert_eq!((sent.seq, sent.delivered), (3, 4));
        assert_eq!(sent.segment_ids, [1, 2, 3, 4]);
        assert_eq!(sent.segment_text, "abcd");
        assert_eq!(delivery.generated().load(Ordering::Relaxed), 4);
        assert!(sent.first_token.is_some() && sent.last_token >= sent.first_token);
    }
}
