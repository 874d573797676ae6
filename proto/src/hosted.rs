//! `Worker.Serve` streams between a router and a worker hosted in the same process, handed
//! over as in-memory message streams: no HTTP/2 framing, no encoding, no connection task
//! between them. The router's link reads and writes the same frames it would over gRPC, and
//! the worker serves them as it serves a network stream, so every guarantee of the stream
//! (ordering, cancel on drop, credit) holds unchanged.
//!
//! [`pair`] gives the router's [`StreamDialer`] and the worker's [`StreamIncoming`].

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::v1;

/// One direction of a stream: messages, or the status that ended it.
pub type Frames<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A stream the router opened: its frames to the worker, and where the worker's frames go.
pub struct StreamRequest {
    /// The router's frames (starts, cancels, credit), in order.
    pub frames: Frames<v1::RouterFrame>,
    /// Answered with the worker's frames once it serves the stream.
    pub reply: oneshot::Sender<Frames<v1::WorkerFrame>>,
}

/// Both ends of a hosted worker's stream hand-off.
pub fn pair() -> (StreamDialer, StreamIncoming) {
    let (requests, incoming) = mpsc::unbounded_channel();
    (StreamDialer { requests }, StreamIncoming { incoming })
}

/// The router's end: opens `Worker.Serve` streams on the hosted worker.
#[derive(Clone)]
pub struct StreamDialer {
    requests: mpsc::UnboundedSender<StreamRequest>,
}

impl std::fmt::Debug for StreamDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDialer")
            .field("serving", &!self.requests.is_closed())
            .finish()
    }
}

impl StreamDialer {
    /// Opens a stream carrying `frames`; `UNAVAILABLE` when the worker no longer serves.
    pub async fn serve(
        &self,
        frames: Frames<v1::RouterFrame>,
    ) -> Result<Frames<v1::WorkerFrame>, Status> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Status::unavailable("the hosted worker has stopped serving");
        self.requests
            .send(StreamRequest { frames, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }
}

/// The worker's end: the streams its router opens. Ends when every [`StreamDialer`] is gone.
pub struct StreamIncoming {
    incoming: mpsc::UnboundedReceiver<StreamRequest>,
}

impl std::fmt::Debug for StreamIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamIncoming").finish_non_exhaustive()
    }
}

impl Stream for StreamIncoming {
    type Item = StreamRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    #[tokio::test]
    async fn frames_cross_both_ways_and_a_gone_worker_is_unavailable() {
        let (dialer, mut incoming) = pair();
        let worker = tokio::spawn(async move {
            let StreamRequest { frames, reply } = incoming.next().await.expect("a stream");
            // Echo each start's request id back as a Finished frame.
            let echoed = frames.map(|frame| {
                let Some(v1::router_frame::Frame::Start(start)) = frame?.frame else {
                    return Err(Status::invalid_argument("expected a start"));
                };
                Ok(v1::WorkerFrame {
                    frame: Some(v1::worker_frame::Frame::Finished(v1::Finished {
                        request_id: start.request_id,
                        ..Default::default()
                    })),
                })
            });
            let _ = reply.send(Box::pin(echoed));
            // The next stream finds nobody serving.
        });
        let start = |id: &str| {
            Ok(v1::RouterFrame {
                frame: Some(v1::router_frame::Frame::Start(v1::WorkerStart {
                    request_id: id.into(),
                    ..Default::default()
                })),
            })
        };
        let frames = futures::stream::iter([start("a"), start("b")]);
        let replies: Vec<_> = dialer
            .serve(Box::pin(frames))
            .await
            .expect("served")
            .collect()
            .await;
        let ids: Vec<String> = replies
            .into_iter()
            .map(|frame| match frame.expect("a frame").frame {
                Some(v1::worker_frame::Frame::Finished(f)) => f.request_id,
                other => panic!("expected Finished, got {other:?}"),
            })
            .collect();
        assert_eq!(ids, ["a", "b"]);
        worker.await.unwrap();
        let gone = dialer
            .serve(Box::pin(futures::stream::empty()))
            .await
            .err()
            .expect("nobody serves any more");
        assert_eq!(gone.code(), tonic::Code::Unavailable);
    }
}
